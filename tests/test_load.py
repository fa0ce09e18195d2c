"""Loading float models: clear one-line errors naming the path."""

import json

import pytest
import torch

from quant.load import ModelLoadError, load_float_model


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'}: no such file"):
        load_float_model(tmp_path / "nope")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'"):
        load_float_model(tmp_path)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError) as err:
        load_float_model(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_float_model(tmp_path)


def test_hf_directory_roundtrip(tmp_path, tokenizer):
    from tests.harness import tiny_mpt

    model = tiny_mpt(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_float_model(tmp_path)
    assert loaded.model.config.model_type == "mpt" and loaded.name == tmp_path.name
    assert len(loaded.fingerprint) == 16


@pytest.fixture(params=["safetensors", "bin"])
def sharded_mpt(request, tmp_path, tokenizer):
    """A tiny MPT saved in several shards with their index, as MPT-7B-chat (.bin) and Vicuna (either) ship."""
    from tests.harness import tiny_mpt

    model = tiny_mpt(len(tokenizer))
    model.save_pretrained(tmp_path, max_shard_size="300KB", safe_serialization=request.param == "safetensors")
    tokenizer.save_pretrained(tmp_path)
    index = json.loads(next(tmp_path.glob("*.index.json")).read_text())
    assert len(set(index["weight_map"].values())) > 2
    return model, tmp_path, index


def test_a_sharded_checkpoint_loads_every_tensor(sharded_mpt):
    model, path, _ = sharded_mpt
    loaded = load_float_model(path).model
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_a_missing_shard_is_one_error_naming_it(sharded_mpt):
    _, path, index = sharded_mpt
    shard = path / sorted(set(index["weight_map"].values()))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"{shard}: missing") as err:
        load_float_model(path)
    assert "\n" not in str(err.value)


def test_a_shard_with_the_wrong_tensors_is_one_error_naming_it(sharded_mpt):
    _, path, index = sharded_mpt
    first, second = sorted(set(index["weight_map"].values()))[:2]
    (path / second).unlink()
    (path / first).rename(path / second)  # the second shard's name, the first shard's tensors
    (path / first).write_bytes((path / second).read_bytes())
    with pytest.raises(ModelLoadError, match=f"{path / second}: lacks ") as err:
        load_float_model(path)
    assert "which " in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_shard_is_one_error_naming_it(sharded_mpt):
    _, path, index = sharded_mpt
    shard = path / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=f"{shard}: unreadable weight file"):
        load_float_model(path)
