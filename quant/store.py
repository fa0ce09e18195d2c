"""An INT8 model for serving: a checkpoint as is, or a float model quantized once and cached under a key
made of the source's fingerprint and the recipe, so the next start loads the checkpoint directly."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from quant.checkpoint import QuantizedModel, is_checkpoint, load_checkpoint, save_checkpoint
from quant.load import DEFAULT_MODEL, DEFAULT_NAME, fingerprint, load_float_model, resolve_model_path
from quant.pipeline import quantize
from quant.smoothquant import Recipe

log = logging.getLogger(__name__)


def cache_key(spec: str, path: Path, recipe: Recipe) -> str:
    name = DEFAULT_NAME if spec == DEFAULT_MODEL else path.stem if path.is_file() else path.name
    recipe_hash = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{fingerprint(path)}-{recipe.name}-{recipe_hash}"


def int8_checkpoint(spec: str, recipe: Recipe, cache_dir: Path) -> Path:
    """The INT8 checkpoint to serve for ``spec``: the checkpoint itself, the cached one, or one quantized
    now and cached."""
    path = resolve_model_path(spec, cache_dir)
    if path.is_dir() and is_checkpoint(path):
        return path
    cached = Path(cache_dir).expanduser() / cache_key(spec, path, recipe)
    if not is_checkpoint(cached):
        log.info("no cached INT8 checkpoint for %s: quantizing (%s)", path, recipe.name)
        quantized = quantize(load_float_model(spec, lazy=True, cache_dir=cache_dir), recipe)
        save_checkpoint(quantized.model, quantized.tokenizer, cached, quantized.manifest, force=True)
    return cached


def load_int8_model(spec: str, recipe: Recipe, cache_dir: Path) -> QuantizedModel:
    path = int8_checkpoint(spec, recipe, cache_dir)
    log.info("loading INT8 checkpoint %s", path)
    return load_checkpoint(path)
