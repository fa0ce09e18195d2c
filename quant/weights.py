"""Where a float model's weights come from while it is quantized: already in memory (a GGUF, read whole by
transformers), or read from a Hugging Face directory's weight files one block at a time, into a model built
with its parameters on the meta device, so a 7B model is never whole in float."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from quant.shards import INDEXES, ShardError, tensor_names, unreadable


class InMemoryWeights:
    """The model's parameters are real already: nothing to read."""

    def materialize(self, model: nn.Module, prefix: str = "", exclude: str | None = None) -> None:
        pass


class FileWeights:
    """Reads the tensors of ``directory`` (one weight file, or shards listed in an index) on demand, as
    float32, into the meta parameters of a model whose names are the stored tensors' names."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.locations = self._locate(directory)

    @staticmethod
    def _locate(directory: Path) -> dict[str, Path]:
        for name in INDEXES:
            if (directory / name).is_file():
                weight_map = json.loads((directory / name).read_text())["weight_map"]
                return {tensor: directory / shard for tensor, shard in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (directory / single).is_file():
                return dict.fromkeys(tensor_names(directory / single), directory / single)
        raise ShardError(f"{directory}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")

    def materialize(self, model: nn.Module, prefix: str = "", exclude: str | None = None) -> None:
        """Read every meta parameter of ``model`` under ``prefix`` (not under ``exclude``); a tied parameter
        is read once, under whichever of its names is stored."""
        aliases: dict[int, list[str]] = defaultdict(list)
        for name, param in model.named_parameters(remove_duplicate=False):
            if param.is_meta and name.startswith(prefix) and not (exclude and name.startswith(exclude + ".")):
                aliases[id(param)].append(name)
        wanted: dict[Path, list[list[str]]] = defaultdict(list)
        for names in aliases.values():
            stored = next((n for n in names if n in self.locations), None)
            if stored is None:
                raise ShardError(f"{self.directory}: no weight file holds {names[0]}")
            wanted[self.locations[stored]].append([stored] + [n for n in names if n != stored])
        for path, tensors in wanted.items():
            for names, tensor in zip(tensors, _read(path, [names[0] for names in tensors])):
                parameter = nn.Parameter(tensor, requires_grad=False)
                for name in names:
                    parent, _, leaf = name.rpartition(".")
                    model.get_submodule(parent)._parameters[leaf] = parameter


def _read(path: Path, names: list[str]) -> list[torch.Tensor]:
    """Float32 copies of ``names`` from one weight file; nothing of the file stays mapped afterwards."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as stored:
                return [stored.get_tensor(n).to(torch.float32, copy=True) for n in names]
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tensors = [state[n].to(torch.float32, copy=True) for n in names]
        del state
        return tensors
    except Exception as exc:  # a truncated or foreign file: many exception types, one message
        raise unreadable(path, exc) from None
