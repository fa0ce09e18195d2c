"""A model directory's weight files checked against their index before anything is loaded: published 7B
checkpoints come in shards (``model-00001-of-00002.safetensors`` or ``pytorch_model-00001-of-00002.bin``)
listed in ``*.index.json``, and a shard that is missing, or holds other tensors than the index says, would
otherwise surface as a traceback deep in transformers, or as layers left at their random initial values."""

from __future__ import annotations

import json
from pathlib import Path

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class ShardError(ValueError):
    """A shard is missing, unreadable or does not hold the tensors its index lists; the message names it."""


def first_line(exc: Exception) -> str:
    """An exception as one line: its message's first, or its type when it has none."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def unreadable(path: Path, exc: Exception) -> ShardError:
    return ShardError(f"{path}: unreadable weight file ({first_line(exc)})")


def tensor_names(shard: Path) -> set[str]:
    """The tensors stored in one weight file, read without loading them (safetensors' header; a PyTorch
    file memory-mapped with ``weights_only``, so nothing in it runs)."""
    try:
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as stored:
                return set(stored.keys())
        import torch

        return set(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
    except Exception as exc:  # a truncated or foreign file: many exception types, one message
        raise unreadable(shard, exc) from None


def check_shards(directory: Path) -> None:
    """Every shard an index of ``directory`` lists exists and holds the tensors listed for it."""
    for name in INDEXES:
        index = directory / name
        if not index.is_file():
            continue
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{index}: unreadable index ({type(exc).__name__}: {exc})") from None
        expected: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            expected.setdefault(shard, set()).add(tensor)
        for shard, tensors in sorted(expected.items()):
            path = directory / shard
            if not path.is_file():
                raise ShardError(f"{path}: missing ({index.name} lists {len(tensors)} tensors in it)")
            absent = sorted(tensors - tensor_names(path))
            if absent:
                more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
                raise ShardError(f"{path}: lacks {', '.join(absent[:3])}{more}, which {index.name} places in it")
