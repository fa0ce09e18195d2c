"""Llama-shaped models with random weights, for speed at real sizes: decoding reads every weight once
per token, so the bytes per token are what matter, not the values. ``--model random:llama-1b`` builds
one once (a Hugging Face directory under the cache) and every variant loads it like any HF model."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "random:"
SHAPES = {  # TinyLlama-1.1B's shape: 22 layers, hidden 2048, grouped-query attention with 4 KV heads
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
}


def is_random_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def random_model_dir(spec: str, cache_dir: Path) -> Path:
    """The HF directory for ``random:SHAPE``, built on first use: that shape's config, weights drawn as
    transformers initializes them (seed 0), and the default model's tokenizer (prompts must tokenize)."""
    shape = spec.removeprefix(PREFIX)
    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; expected one of {sorted(SHAPES)}")
    out = Path(cache_dir).expanduser() / "random" / shape
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quant.load import default_model_path

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    log.info("building %s with random weights (%s)", spec, SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out
