"""Loading float models: clear one-line errors naming the path."""

import json

import pytest

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
    from tests.conftest import tiny_mpt

    model = tiny_mpt(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_float_model(tmp_path)
    assert loaded.model.config.model_type == "mpt" and loaded.name == tmp_path.name
    assert len(loaded.fingerprint) == 16
