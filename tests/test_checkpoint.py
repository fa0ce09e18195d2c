"""quantize -> save -> load -> generate on tiny random Llama and MPT models."""

import json
import os

import pytest
import torch

from quant.checkpoint import (
    CheckpointError,
    is_checkpoint,
    load_checkpoint,
    read_safetensors,
    save_checkpoint,
    weight_bytes,
)
from quant.int8 import Int8Embedding, Int8Linear
from quant.smoothquant import Recipe, linear_names
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.runtime.decoders import HFDecoder
from tests.harness import quantized_tiny


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_roundtrip_gives_identical_logits_and_generation(tiny_model, tokenizer, tmp_path, scheme):
    manifest = quantized_tiny(tiny_model, Recipe(alpha=None, scheme=scheme))
    ids = torch.randint(0, 2000, (1, 20), generator=torch.Generator().manual_seed(7))
    expected = tiny_model(input_ids=ids).logits
    out = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", manifest)
    loaded = load_checkpoint(out)
    assert torch.equal(loaded.model(input_ids=ids).logits, expected)
    # INT8 stays INT8 in memory; the tied LM head shares the embedding's tensors
    kinds = {type(m) for m in loaded.model.modules()}
    assert Int8Linear in kinds and Int8Embedding in kinds and torch.nn.Linear not in kinds
    head, emb = loaded.model.get_output_embeddings(), loaded.model.get_input_embeddings()
    assert head.weight is emb.weight
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["recipe"]["scheme"] == scheme and saved["versions"]["torch"] == torch.__version__
    assert set(saved["alphas"]) == set(linear_names(tiny_model))
    # and it generates, the same greedy tokens as the model that was saved
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = ids[0].tolist()
    before = [s.text for s in Engine(HFDecoder(tiny_model), tokenizer, 256, set()).generate(prompt, params)]
    after = [s.text for s in Engine(HFDecoder(loaded.model), tokenizer, 256, set()).generate(prompt, params)]
    assert len(after) == 8 and after == before


@torch.no_grad()
def test_loaded_weight_only_layers_run_prefill(tiny_model, tokenizer, tmp_path):
    """Fallback layers load aligned: torch's weight-only kernel crashes on misaligned weights at M > 1."""
    manifest = quantized_tiny(tiny_model, Recipe(alpha=0.5, fallback_error=0.0))
    ids = torch.randint(0, 2000, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = tiny_model(input_ids=ids).logits
    loaded = load_checkpoint(save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", manifest))
    weights = [m.weight for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert weights and all(w.data_ptr() % 64 == 0 for w in weights)
    assert torch.equal(loaded.model(input_ids=ids).logits, expected)


def test_refuses_to_overwrite_without_force(tiny_model, tokenizer, tmp_path):
    manifest = quantized_tiny(tiny_model)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(tiny_model, tokenizer, out, manifest)
    assert (out / "keep.txt").exists()
    save_checkpoint(tiny_model, tokenizer, out, manifest, force=True)
    assert is_checkpoint(out) and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copies left


def test_interrupted_save_leaves_nothing_that_loads(tiny_model, tokenizer, tmp_path, monkeypatch):
    manifest = quantized_tiny(tiny_model)

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", manifest)
    assert not (tmp_path / "ckpt").exists()
    assert os.listdir(tmp_path) == []


def test_load_rejects_a_damaged_checkpoint(tiny_model, tokenizer, tmp_path):
    out = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", quantized_tiny(tiny_model))
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="ckpt"):
        load_checkpoint(out)
    (out / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a q8chat-int8"):
        load_checkpoint(out)


def test_safetensors_are_read_tensor_by_tensor_as_stored(tmp_path):
    from safetensors.torch import load_file, save_file

    stored = {
        "int8": torch.randint(-128, 127, (33, 7), dtype=torch.int8),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "scale": torch.tensor(0.25),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    save_file(stored, tmp_path / "w.safetensors")
    read = dict(read_safetensors(tmp_path / "w.safetensors"))
    expected = load_file(tmp_path / "w.safetensors")
    assert read.keys() == expected.keys()
    for name, tensor in read.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        assert tensor.data_ptr() % 64 == 0 or tensor.numel() == 0  # the weight-only INT8 kernel needs it
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated at tensor"):
        dict(read_safetensors(tmp_path / "cut.safetensors"))
    save_file({"f64": torch.zeros(2, dtype=torch.float64)}, tmp_path / "f64.safetensors")
    with pytest.raises(CheckpointError, match="tensor f64 has an unsupported type F64"):
        dict(read_safetensors(tmp_path / "f64.safetensors"))


def test_weight_bytes_counts_a_tensor_once_where_it_is_a_parameter_of_one_module_and_a_buffer_of_another():
    """As after a compiled step's build (``buffers_as_parameters``) on a model with a tied embedding and head."""
    shared = torch.zeros(10, 4, dtype=torch.int8)
    model = torch.nn.Module()
    model.embed, model.head = torch.nn.Module(), torch.nn.Module()
    model.embed.register_buffer("weight", shared)
    model.head.weight = torch.nn.Parameter(shared, requires_grad=False)
    model.head.register_buffer("scale", torch.zeros(10))
    assert weight_bytes(model) == 40 + 40
