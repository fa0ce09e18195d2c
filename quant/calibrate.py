"""Calibration: token windows of shipped text, and per-channel activation statistics from forward hooks.

The statistics are plain data: for every hooked linear, the per-input-channel max |x| over all
calibration tokens, and a random sample of its input rows (used to tune alpha, measure error and
round weights by GPTQ).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from prompts import calibration_text

SAMPLE_ROWS = 2048  # input rows kept per hooked linear


def token_windows(tokenizer, text: str, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` windows of ``length`` token ids, taken at seeded random offsets of ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if len(ids) < length + 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)
    return [ids[s : s + length].unsqueeze(0) for s in starts.tolist()]


def calibration_windows(tokenizer, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    return token_windows(tokenizer, calibration_text(), count, length, seed)


class ActivationStats:
    """Per recorded module: the per-input-channel max |x| and a random sample of input rows, a share of
    them from each of ``batches`` calibration batches. Every module draws its rows from a generator of its
    own, so the statistics are the same whether the model runs whole or one block at a time."""

    def __init__(self, batches: int, sample_rows: int = SAMPLE_ROWS, seed: int = 0) -> None:
        self.per_batch = max(1, -(-sample_rows // max(1, batches)))
        self.sample_rows, self.seed = sample_rows, seed
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.generators: dict[str, torch.Generator] = {}

    def record(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        m = x.abs().amax(dim=0)
        self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
        generator = self.generators.setdefault(name, torch.Generator().manual_seed(self.seed))
        rows = torch.randperm(x.shape[0], generator=generator)[: self.per_batch]
        self.samples.setdefault(name, []).append(x[rows].clone())

    @contextmanager
    def hooks(self, model: nn.Module, names: Iterable[str]) -> Iterator[None]:
        """Record the input of each of ``names`` (modules of ``model``) while the block runs."""
        handles = [
            model.get_submodule(n).register_forward_hook(lambda _m, inputs, _out, n=n: self.record(n, inputs[0]))
            for n in names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            n: {"absmax": self.absmax[n], "sample": torch.cat(self.samples[n])[: self.sample_rows]} for n in self.absmax
        }


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    names: Iterable[str],
    batches: list[torch.Tensor],
    sample_rows: int = SAMPLE_ROWS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``batches`` through the whole float ``model``; return ``{name: {"absmax": [in], "sample": [rows,
    in]}}``: the same statistics ``quant.layerwise`` gathers one block at a time, all at once (its reference).

    Only the base model runs: the LM head's input is its output, so the head's statistics come without
    computing logits for every calibration token (a fifth of a small model's work, with its vocabulary)."""
    names = list(names)
    stats = ActivationStats(len(batches), sample_rows, seed)
    head = next((n for n in names if model.get_submodule(n) is model.get_output_embeddings()), None)
    with stats.hooks(model, [n for n in names if n != head]):
        for batch in tqdm(batches, desc="calibrating", unit="seq", disable=not progress):
            hidden = model.base_model(input_ids=batch, use_cache=False)[0]
            if head is not None:
                stats.record(head, hidden)
    return stats.result()
