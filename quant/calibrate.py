"""Calibration: token windows of shipped text, and per-channel activation statistics from forward hooks.

The statistics are plain data: for every hooked linear, the per-input-channel max |x| over all
calibration tokens, and a random sample of its input rows (used to tune alpha, measure error and
round weights by GPTQ).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from prompts import calibration_text


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


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    names: Iterable[str],
    batches: list[torch.Tensor],
    sample_rows: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``batches`` through ``model``; return ``{name: {"absmax": [in], "sample": [rows, in]}}``.

    Only the base model runs: the LM head's input is its output, so the head's statistics come without
    computing logits for every calibration token (a fifth of a small model's work, with its vocabulary)."""
    names = list(names)
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_batch = max(1, -(-sample_rows // max(1, len(batches))))
    generator = torch.Generator().manual_seed(seed)

    def record(name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        m = x.abs().amax(dim=0)
        absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        rows = torch.randperm(x.shape[0], generator=generator)[:per_batch]
        samples[name].append(x[rows].clone())

    head = next((n for n in names if model.get_submodule(n) is model.get_output_embeddings()), None)
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, inputs, _out, n=n: record(n, inputs[0]))
        for n in names
        if n != head
    ]
    try:
        for batch in tqdm(batches, desc="calibrating", unit="seq", disable=not progress):
            hidden = model.base_model(input_ids=batch, use_cache=False)[0]
            if head is not None:
                record(head, hidden)
    finally:
        for h in handles:
            h.remove()
    return {n: {"absmax": absmax[n], "sample": torch.cat(samples[n])[:sample_rows]} for n in names}
