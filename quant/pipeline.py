"""Float model in, INT8 model out: calibrate, smooth, convert, and describe the result for the manifest."""

from __future__ import annotations

import logging

from quant.calibrate import calibration_windows, collect_activation_stats
from quant.checkpoint import QuantizedModel
from quant.families import context_window
from quant.load import FloatModel
from quant.smoothquant import QuantReport, Recipe, group_inputs, quantize_model

log = logging.getLogger(__name__)


def calibrate(float_model: FloatModel, recipe: Recipe, progress: bool = True) -> dict:
    """Activation statistics of the float model on the shipped calibration text, in windows no longer than the
    model's context (MPT's ALiBi bias stops at its max_seq_len)."""
    model = float_model.model
    length = min(recipe.calib_length, context_window(model.config))
    if length < recipe.calib_length:
        log.info("calibration windows of %d tokens: the model's context", length)
    batches = calibration_windows(float_model.tokenizer, recipe.calib_samples, length, recipe.seed)
    return collect_activation_stats(model, group_inputs(model), batches, seed=recipe.seed, progress=progress)


def manifest_for(float_model: FloatModel, recipe: Recipe, report: QuantReport) -> dict:
    return {
        "name": float_model.name,
        "source": {"path": str(float_model.path), "fingerprint": float_model.fingerprint},
        "recipe": recipe.to_dict(),
        "alphas": report.alphas(),
        "errors": {name: round(g.error, 6) for g in report.groups for name in g.linears},
        "fallback": report.fallback,
    }


def quantize(
    float_model: FloatModel, recipe: Recipe, stats: dict | None = None, progress: bool = True
) -> QuantizedModel:
    """Quantize ``float_model.model`` in place (pass a copy to keep the float one)."""
    stats = stats if stats is not None else calibrate(float_model, recipe, progress)
    report = quantize_model(float_model.model, stats, recipe, progress=progress)
    if report.fallback:
        log.warning(
            "%d layers keep BF16 activations (INT8 weights; relative error above %g): %s",
            len(report.fallback),
            recipe.fallback_error,
            ", ".join(report.fallback),
        )
    return QuantizedModel(float_model.model, float_model.tokenizer, manifest_for(float_model, recipe, report), None)
