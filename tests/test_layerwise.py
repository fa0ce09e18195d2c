"""Layer-by-layer quantization from sharded BF16 checkpoints (.bin and safetensors): one float block at a time,
the same INT8 model as the whole float model quantized at once. Random models at real shapes, written straight
into BF16 shards."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from quant.calibrate import collect_activation_stats
from quant.checkpoint import load_checkpoint, save_checkpoint
from quant.families import all_groups, family_of
from quant.layerwise import calibration_batches
from quant.load import load_float_model
from quant.pipeline import quantize
from quant.random_model import SHAPES, Shape, build, random_model_dir
from quant.smoothquant import Recipe, quantize_model
from quant.weights import FileWeights
from tests.harness import tiny_llama, tiny_mpt

RECIPE = Recipe(calib_samples=4, calib_length=32)


@pytest.fixture(params=[("llama", "safetensors"), ("llama", "bin"), ("mpt", "safetensors"), ("mpt", "bin")])
def sharded(request, tmp_path, tokenizer):
    """A tiny model stored as published 7B models are: BF16, in shards listed by an index."""
    family, form = request.param
    model = {"llama": tiny_llama, "mpt": tiny_mpt}[family](len(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "float", max_shard_size="100KB", safe_serialization=form == "safetensors")
    tokenizer.save_pretrained(tmp_path / "float")
    assert len(set(json.loads(next((tmp_path / "float").glob("*.index.json")).read_text())["weight_map"].values())) > 2
    return tmp_path / "float"


@torch.no_grad()
def test_layer_by_layer_from_shards_is_the_whole_model_quantized_at_once(sharded, tmp_path):
    whole = load_float_model(sharded)
    names = [g.key for g in all_groups(whole.model)]
    stats = collect_activation_stats(whole.model, names, calibration_batches(whole, RECIPE), progress=False)
    quantize_model(whole.model, stats, RECIPE, progress=False)

    lazy = load_float_model(sharded, lazy=True)
    assert all(p.is_meta for p in lazy.model.parameters())  # nothing read before quantization
    quantized = quantize(lazy, RECIPE, progress=False)
    expected, got = whole.model.state_dict(), quantized.model.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []

    out = save_checkpoint(quantized.model, quantized.tokenizer, tmp_path / "int8", quantized.manifest)
    ids = torch.randint(0, 2000, (1, 24), generator=torch.Generator().manual_seed(5))
    assert torch.equal(load_checkpoint(out).model(input_ids=ids).logits, whole.model(input_ids=ids).logits)


def test_only_one_block_is_ever_in_float(sharded, monkeypatch):
    """Each read of weights finds every earlier block converted: float linears of one block at most."""
    float_linears: list[int] = []
    read = FileWeights.materialize

    def counting(self, model, prefix="", exclude=None):
        read(self, model, prefix, exclude)
        blocks = model.get_submodule(family_of(model.config.model_type).blocks)
        float_linears.append(
            sum(type(m) is nn.Linear and not m.weight.is_meta for block in blocks for m in block.modules())
        )

    monkeypatch.setattr(FileWeights, "materialize", counting)
    lazy = load_float_model(sharded, lazy=True)
    quantize(lazy, RECIPE, progress=False)
    per_block = sum(len(g.linears) for g in family_of(lazy.model.config.model_type).groups)
    assert len(float_linears) == 1 + len(lazy.model.get_submodule(family_of(lazy.model.config.model_type).blocks))
    assert float_linears[0] == 0 and max(float_linears) == per_block


def test_a_tensor_no_shard_holds_is_one_error_naming_it(sharded):
    index_path = next(sharded.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    missing = next(name for name in index["weight_map"] if ".1." in name)
    del index["weight_map"][missing]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{sharded}: no weight file holds {missing}"):
        quantize(load_float_model(sharded, lazy=True), RECIPE, progress=False)


@pytest.mark.parametrize(
    "shape",
    [
        Shape(
            "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4), "default"
        ),
        Shape("mpt", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=256), "gpt-neox-20b"),
    ],
    ids=["llama", "mpt"],
)
def test_a_random_model_is_written_in_bf16_shards_and_quantizes(shape, tmp_path):
    out = build(shape, tmp_path / "model", tmp_path / "cache", shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as stored:
            assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"BF16"}
    loaded = load_float_model(out)
    assert loaded.model.config.model_type == shape.family
    # the class is named as published checkpoints name it: llama.cpp's converter reads the family from it
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(loaded.model).__name__]
    if shape.family == "mpt":  # MPT-7B-chat's: ChatML's tokens, <|endoftext|> ends a turn's text, a tied head
        assert {"<|im_start|>", "<|im_end|>"} <= set(loaded.tokenizer.get_vocab())
        assert loaded.tokenizer.eos_token == "<|endoftext|>" and "lm_head.weight" not in index["weight_map"]
    quantized = quantize(load_float_model(out, lazy=True), RECIPE, progress=False)
    assert not any(p.is_meta for p in quantized.model.parameters())


@pytest.mark.parametrize("name,params", [("llama-7b", 6.74e9), ("mpt-7b", 6.65e9), ("llama-1b", 1.10e9)])
def test_the_random_shapes_are_the_published_models_sizes(name, params):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig

    shape = SHAPES[name]
    config = {"llama": LlamaConfig, "mpt": MptConfig}[shape.family](
        **{"vocab_size": 32000, **shape.config}, tie_word_embeddings=shape.family == "mpt"
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_an_unknown_random_shape_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown random model shape 'gpt-9'; expected one of"):
        random_model_dir("random:gpt-9", tmp_path)
