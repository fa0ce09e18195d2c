"""Float model in, INT8 model out: quantize block by block, and describe the result for the manifest."""

from __future__ import annotations

import logging

from quant.checkpoint import QuantizedModel
from quant.layerwise import quantize_layerwise
from quant.load import FloatModel
from quant.smoothquant import QuantReport, Recipe

log = logging.getLogger(__name__)


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
    """Quantize ``float_model.model`` in place (pass a copy to keep the float one); ``stats``: see
    ``quantize_layerwise``."""
    report = quantize_layerwise(float_model, recipe, stats, progress)
    if report.fallback:
        log.warning(
            "%d layers keep BF16 activations (INT8 weights; relative error above %g): %s",
            len(report.fallback),
            recipe.fallback_error,
            ", ".join(report.fallback),
        )
    return QuantizedModel(float_model.model, float_model.tokenizer, manifest_for(float_model, recipe, report), None)
