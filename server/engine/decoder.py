"""What the engine needs of a model: the ``Decoder`` protocol. The runtime's decoders (eager Hugging Face,
the compact compiled model) and the bench's llama.cpp adapter implement it; the engine imports none of them."""

from __future__ import annotations

from typing import Protocol

import torch


class Decoder(Protocol):
    description: str  # what runs, for the start-up line
    slots: int  # sequences whose caches it holds at once, each in its own slot

    def forward(self, ids: list[int], start: int, slot: int = 0) -> torch.Tensor:
        """The logits after ``ids``, placed at positions ``start...`` of slot ``slot``, on top of the cached
        positions before ``start`` (whatever the cache held from ``start`` on is overwritten or dropped)."""

    def decode(self, tokens: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Logits ``[len(tokens), vocab]``: each token placed at its position of its slot (only needed with
        more than one slot)."""

    def reset(self, slot: int = 0) -> None:
        """Forget the slot's cached positions."""

    def snapshot(self, length: int, slot: int = 0) -> tuple[object, int]:
        """A copy of the slot's cached positions ``0...length-1`` and its size in bytes (only needed by an
        engine that keeps past conversations)."""

    def restore(self, kept: object, length: int, slot: int = 0) -> None:
        """Make positions ``0...length-1`` of the slot's cache those of a snapshot (of at least ``length``)."""
