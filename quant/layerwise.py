"""Quantize one decoder block at a time, as GPTQ's sequential mode walks a model: only the block being
quantized is in float (read from the weight files when the model was loaded lazily), and the calibration
activations are carried from one block to the next.

The activations carried on are the float block's outputs, computed before the block is converted: every
block is calibrated on what the float model feeds it, exactly as when the whole float model runs with hooks
(``quant.calibrate.collect_activation_stats``), so the result is the same INT8 model, at a peak memory of the
INT8 weights plus one float block.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from quant.calibrate import ActivationStats, calibration_windows
from quant.families import bound_groups, context_window, family_of, head_group
from quant.smoothquant import QuantReport, Recipe, quantize_group

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the first block's hook: what the base model feeds it is all that is wanted."""


def first_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor
) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other positional arguments, keyword arguments) the base model passes its first block
    for ``batch``: the rotary tables, masks or ALiBi bias each family builds in front of its blocks."""
    captured = {}

    def capture(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model.base_model(input_ids=batch, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, args[1:], kwargs


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def calibration_batches(float_model, recipe: Recipe) -> list[torch.Tensor]:
    """The calibration windows, no longer than the model's context (MPT's ALiBi bias stops at max_seq_len)."""
    length = min(recipe.calib_length, context_window(float_model.model.config))
    if length < recipe.calib_length:
        log.info("calibration windows of %d tokens: the model's context", length)
    return calibration_windows(float_model.tokenizer, recipe.calib_samples, length, recipe.seed)


@torch.no_grad()
def quantize_layerwise(float_model, recipe: Recipe, stats: dict | None = None, progress: bool = True) -> QuantReport:
    """Convert ``float_model.model`` in place, block by block, reading each block's float weights from
    ``float_model.weights`` just before it is converted. ``stats`` caches activation statistics across calls
    on copies of one float model (``q8chat eval`` compares recipes on the same calibration): filled when
    empty, used as they are when complete."""
    model, weights = float_model.model, float_model.weights
    family = family_of(model.config.model_type)
    blocks = model.get_submodule(family.blocks)
    groups, head = bound_groups(model), head_group(model)
    keep, stats = stats is not None, {} if stats is None else stats
    calibrating = any(g.key not in stats for g in [*groups, head])
    weights.materialize(model, exclude=family.blocks)  # embedding, final norm, LM head
    if calibrating:
        batches = calibration_batches(float_model, recipe)
        inputs = [first_block_inputs(model, blocks, batch) for batch in batches]
    report = QuantReport()
    for i in tqdm(range(len(blocks)), desc="quantizing", unit="layer", disable=not progress):
        weights.materialize(model, prefix=f"{family.blocks}.{i}.")
        block_groups = [g for g in groups if g.block == i]
        if calibrating:
            recorder = ActivationStats(len(inputs), seed=recipe.seed)
            with recorder.hooks(model, [g.key for g in block_groups]):
                inputs = [(_run_block(blocks[i], h, args, kwargs), args, kwargs) for h, args, kwargs in inputs]
            stats.update(recorder.result())
        for group in block_groups:
            quantize_group(model, group, stats, recipe, report)
            if not keep:
                del stats[group.key]  # a 7B block's samples are 190 MB
    if calibrating:
        recorder = ActivationStats(len(inputs), seed=recipe.seed)
        final_norm = model.get_submodule(family.final_norm)
        for hidden, _, _ in inputs:
            recorder.record(head.key, final_norm(hidden))
        stats.update(recorder.result())
    quantize_group(model, head, stats, recipe, report)
    return report
