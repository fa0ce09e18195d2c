"""What the engine needs of a model: the ``Decoder`` protocol. The runtime's decoders (eager Hugging Face,
the compact compiled model) and the bench's llama.cpp adapter implement it; the engine imports none of them."""

from __future__ import annotations

from typing import Protocol

import torch


class Decoder(Protocol):
    description: str  # what runs, for the start-up line

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """The logits after ``ids``, placed at positions ``start...`` on top of the cached positions before
        ``start`` (whatever the cache held from ``start`` on is overwritten or dropped)."""

    def reset(self) -> None:
        """Forget the cached positions."""

    def snapshot(self, length: int) -> tuple[object, int]:
        """A copy of cached positions ``0...length-1`` and its size in bytes (only needed by an engine that
        keeps past conversations)."""

    def restore(self, kept: object, length: int) -> None:
        """Make positions ``0...length-1`` of the cache those of a snapshot (of at least ``length``)."""
