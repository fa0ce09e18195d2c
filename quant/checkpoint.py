"""Save and load quantized models: ``model.safetensors`` (INT8 weights and scales), the model config,
the tokenizer, and ``manifest.json`` (recipe, per-layer alpha, fallback layers, versions, source).

A checkpoint is written into a hidden sibling directory and renamed into place only when complete, so
an interrupted run never leaves a directory that loads as valid. Loading builds the model on the meta
device from its config, swaps in the INT8 modules the manifest lists, and assigns the stored tensors:
no calibration and no float copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quant.families import set_submodule
from quant.int8 import Int8Embedding, Int8Linear

log = logging.getLogger(__name__)

FORMAT = "q8chat-int8"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PLAIN_CONFIGS = {"llama"}  # families whose config serving reads without its class (``read_config``)


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message names the path and the reason."""


@dataclass
class QuantizedModel:
    model: nn.Module
    tokenizer: object
    manifest: dict
    path: Path | None

    @property
    def name(self) -> str:
        return self.manifest["name"]


def versions() -> dict[str, str]:
    found = {}
    for package in ("q8chat", "torch", "transformers", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def describe_modules(model: nn.Module) -> tuple[dict[str, dict], dict[str, str]]:
    """The INT8 modules of ``model`` as plain specs, and the LM heads tied to an embedding."""
    specs: dict[str, dict] = {}
    embeddings: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Embedding):
            specs[name] = {
                "kind": "int8_embedding",
                "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim,
                "padding_idx": module.padding_idx,
                "column_scale": module.column_scale is not None,
            }
            embeddings[id(module.weight)] = name
        elif isinstance(module, Int8Linear):
            specs[name] = {
                "kind": "int8_linear",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "scheme": module.scheme,
                "smooth": module.smooth is not None,
            }
    tied = {
        name: embeddings[id(module.weight)]
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear) and id(module.weight) in embeddings
    }
    return specs, tied


def _build_module(spec: dict) -> nn.Module:
    if spec["kind"] == "int8_embedding":
        return Int8Embedding(
            spec["num_embeddings"],
            spec["embedding_dim"],
            spec["padding_idx"],
            column_scale=spec["column_scale"],
            device="meta",
        )
    if spec["kind"] == "int8_linear":
        return Int8Linear(
            spec["in_features"],
            spec["out_features"],
            bias=spec["bias"],
            scheme=spec["scheme"],
            smooth=spec["smooth"],
            device="meta",
        )
    raise CheckpointError(f"unknown module kind {spec['kind']!r}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, a shared (tied) tensor once: what a decode step reads. Shared by
    address too: a compiled step's build registers a module's buffers as parameters (``buffers_as_parameters``),
    so a tied tensor can be a buffer of one module and a parameter of another."""
    tensors = {id(t) if t.is_meta else (t.data_ptr(), t.numel()): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent ones included (rotary tables), each shared tensor once."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def check_writable(out: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless ``force`` (checked before a long quantization too)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out}: exists and is not empty (use --force to overwrite)")


def save_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict, force: bool = False) -> Path:
    """Write a complete checkpoint to ``out_dir`` atomically. ``manifest`` holds the recipe and report."""
    out = Path(out_dir).expanduser()
    check_writable(out, force)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        specs, tied = describe_modules(model)
        save_file(_tensors(model), tmp / WEIGHTS, metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "modules": specs,
            "tied": tied,
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved INT8 checkpoint to %s", out)
    return out


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    return manifest


_SAFETENSORS_DTYPES = {
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, each read from the file straight into its own (aligned) memory.
    safetensors' own loaders map the whole file: its pages count as resident until the file is closed,
    beside the tensors copied out of it, twice the weights at a 7B model's start."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, spec in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = spec["data_offsets"]
            if spec["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has an unsupported type {spec['dtype']}")
            tensor = torch.empty(spec["shape"], dtype=_SAFETENSORS_DTYPES[spec["dtype"]])
            if tensor.nbytes != end - begin:
                raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {spec['shape']}")
            f.seek(8 + length + begin)
            if tensor.nbytes and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                raise CheckpointError(f"{path}: truncated at tensor {name}")
            yield name, tensor


def _assign(model: nn.Module, weights: Path) -> None:
    """Put the stored tensors into the model one at a time (``read_safetensors``)."""
    for name, tensor in read_safetensors(weights):
        _assign_one(model, name, tensor, weights.parent)


def _assign_one(model: nn.Module, name: str, tensor: torch.Tensor, path: Path) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"{path}: tensor {name} does not belong to the model")


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer. ``save_checkpoint`` writes a fast tokenizer, which loads without
    ``AutoTokenizer``: that one imports half of transformers' modeling code, dynamo and sympy on the way
    (0.8 s, and 95 MB that stay resident in the server)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@dataclass
class CheckpointInfo:
    """What serving needs of a checkpoint besides its weights."""

    path: Path
    manifest: dict
    config: object
    tokenizer: object

    @property
    def name(self) -> str:
        return self.manifest["name"]


def read_config(path: Path):
    """A checkpoint's model config. A Llama config is read as a plain ``PretrainedConfig``: the checkpoint's
    ``config.json`` holds all of its attributes (``save_pretrained``), and importing ``LlamaConfig`` pulls in
    dynamo, sympy and DTensor through transformers' validators (54 MB that stayed resident in the server).
    Other families need their config class: it maps their attribute names onto the common ones."""
    from transformers import AutoConfig, PretrainedConfig

    values = json.loads((path / "config.json").read_text())
    return (
        PretrainedConfig.from_dict(values)
        if values.get("model_type") in PLAIN_CONFIGS
        else AutoConfig.from_pretrained(path)
    )


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Manifest, config and tokenizer of an INT8 checkpoint, without loading its weights."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    try:
        return CheckpointInfo(path, manifest, read_config(path), load_tokenizer(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load checkpoint ({exc})") from None


def stored_weight_bytes(path: str | Path) -> int:
    """Bytes of the tensors in a checkpoint's weights file (each stored once), read from its header."""
    with open(Path(path) / WEIGHTS, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(
        end - start
        for name, entry in header.items()
        if name != "__metadata__"
        for start, end in [entry["data_offsets"]]
    )


def load_checkpoint(path: str | Path) -> QuantizedModel:
    """Load an INT8 checkpoint written by ``save_checkpoint``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        for name, spec in manifest["modules"].items():
            set_submodule(model, name, _build_module(spec))
        _assign(model, path / WEIGHTS)
        for head, embedding in manifest["tied"].items():
            source = model.get_submodule(embedding)
            target = model.get_submodule(head)
            target.weight, target.weight_scale = source.weight, source.weight_scale
        tokenizer = load_tokenizer(path)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load checkpoint ({exc})") from None
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks tensors: {', '.join(missing[:5])}")
    model.eval()
    return QuantizedModel(model, tokenizer, manifest, path)
