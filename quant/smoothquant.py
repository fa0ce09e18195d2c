"""SmoothQuant: migrate activation outliers into the weights, then convert to W8A8.

Per input channel j: ``s_j = max|X_j|^a / max|W_j|^(1-a)``; ``X W^T = (X / s)(W s)^T`` exactly. 1/s is
folded into the norm in front of a group when there is one, else kept as a pre-scale in the INT8 layer.
``alpha`` is fixed, or tuned per group ("auto", as in Intel Neural Compressor's enhanced SmoothQuant):
try each alpha of a grid and keep the one whose quantized output is closest to the float output on
calibration rows. A group whose error stays above ``fallback_error`` keeps its INT8 weights but runs
with BF16 activations instead (``weight_only``); the manifest and the report list it. Weights are then
rounded by GPTQ on the same calibration rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from quant import defaults
from quant.families import BoundGroup, all_groups, family_of, set_submodule
from quant.gptq import gptq_round
from quant.int8 import QMAX, WEIGHT_ROUNDING, Int8Embedding, Int8Linear
from quant.kernels import REFERENCE

DEFAULT_ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
# Relative output error above which a group's activations stay BF16. On SmolLM2-135M the typical group errs by
# 1e-4 to 4e-4, most down_proj groups (inputs silu(gate) * up, the largest outliers) by 5.6e-4 to 1.2e-3; with all
# of those W8A8 the model measured inside the accuracy target (README), so the threshold only catches worse.
DEFAULT_FALLBACK_ERROR = 2e-3
HEAD_SCHEMES = ("weight_only", "dynamic")
_FLOOR = 1e-5


@dataclass(frozen=True)
class Recipe:
    """How a float model becomes INT8. ``alpha=None`` means auto-tuned per group.

    ``head_scheme``: the LM head's error goes straight into the logits with no layer after it to
    dilute it, so by default it keeps BF16 activations (its weights stay INT8, so no memory is lost).
    ``gptq``: round the block linears' weights by GPTQ (quant/gptq.py); the alpha search itself uses
    round-to-nearest, which ranks alphas alike at a fraction of the cost. The tied head and embedding
    share one table and round to nearest: a lookup wants each row's own error small.
    """

    alpha: float | None = None
    scheme: str = "dynamic"
    head_scheme: str = "weight_only"
    gptq: bool = True
    smooth: bool = True
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    fallback_error: float | None = DEFAULT_FALLBACK_ERROR
    calib_samples: int = defaults.CALIB_SAMPLES
    calib_length: int = defaults.CALIB_LENGTH
    seed: int = 0

    @property
    def name(self) -> str:
        if not self.smooth:
            return f"naive-{self.scheme}"
        return f"{'auto' if self.alpha is None else f'sq{self.alpha:g}'}-{self.scheme}"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "alpha_grid": list(self.alpha_grid),
            "name": self.name,
            "weight_rounding": WEIGHT_ROUNDING,
        }


@dataclass
class GroupResult:
    linears: list[str]
    alpha: float | None
    error: float  # relative squared error of the quantized group output vs float
    fallback: bool


@dataclass
class QuantReport:
    groups: list[GroupResult] = field(default_factory=list)

    @property
    def fallback(self) -> list[str]:
        return [name for g in self.groups if g.fallback for name in g.linears]

    def alphas(self) -> dict[str, float | None]:
        return {name: g.alpha for g in self.groups for name in g.linears}


def smoothing_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel s for a group of linears that share one input."""
    w_absmax = torch.cat([w.detach().float().abs() for w in weights]).amax(dim=0)
    s = act_absmax.clamp(min=_FLOOR).pow(alpha) / w_absmax.clamp(min=_FLOOR).pow(1 - alpha)
    return s.clamp(min=_FLOOR)


def static_input_scale(act_absmax: torch.Tensor, s: torch.Tensor | None) -> float:
    """Per-tensor activation scale after smoothing: max over channels of max|X_j| / s_j, over 127."""
    smoothed = act_absmax if s is None else act_absmax / s
    return max(float(smoothed.max()), _FLOOR) / QMAX


def _quantized_group(
    linears: list[nn.Linear],
    s: torch.Tensor | None,
    scheme: str,
    act_absmax: torch.Tensor,
    prescale: bool,
    gptq_inputs: torch.Tensor | None = None,
) -> list[Int8Linear]:
    """W8A8 versions of ``linears`` with smoothing ``s`` (None: no smoothing). With ``prescale`` the
    1/s stays inside the layers; otherwise the caller has divided the input (norm fold). Weights are
    rounded to nearest, or by GPTQ on ``gptq_inputs`` (calibration rows before smoothing)."""
    input_scale = static_input_scale(act_absmax, s) if scheme == "static" else None
    smooth = (1.0 / s) if (s is not None and prescale) else None
    weights = [lin.weight.detach().float() * (1 if s is None else s) for lin in linears]
    quantized = [
        Int8Linear.from_weight(w, lin.bias, scheme=scheme, input_scale=input_scale, smooth=smooth)
        for w, lin in zip(weights, linears)
    ]
    if gptq_inputs is not None:  # the group shares one input, so one Hessian: GPTQ rounds rows independently
        values = gptq_round(
            torch.cat(weights), torch.cat([m.weight_scale for m in quantized]), gptq_inputs / (1 if s is None else s)
        )
        for module, part in zip(quantized, values.split([m.out_features for m in quantized])):
            module.weight = part.clone()  # own, aligned storage (checkpoints refuse shared views)
    return quantized


def float_output(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """The float group's output on input rows ``x``: what its quantized versions are measured against."""
    with torch.no_grad():
        return torch.cat([lin(x) for lin in linears], dim=-1).float()


@torch.no_grad()
def group_error(
    x: torch.Tensor,
    linears: list[nn.Linear],
    s: torch.Tensor | None,
    scheme: str,
    act_absmax: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> float:
    """Relative squared error of the quantized (and smoothed) group output on input rows ``x`` against
    ``reference`` (default: ``float_output``). The INT8 products are the exact ones (``kernels.REFERENCE``),
    whatever this CPU's kernel rounds."""
    reference = float_output(x, linears) if reference is None else reference
    quantized = torch.cat(
        [q.with_kernel(REFERENCE)(x) for q in _quantized_group(linears, s, scheme, act_absmax, prescale=True)], dim=-1
    )
    return float(((quantized - reference) ** 2).sum() / (reference**2).sum().clamp(min=1e-12))


@torch.no_grad()
def search_alpha(
    x: torch.Tensor, linears: list[nn.Linear], act_absmax: torch.Tensor, scheme: str, grid: tuple[float, ...]
) -> tuple[float, float]:
    """The alpha of ``grid`` with the lowest group error, and that error."""
    reference = float_output(x, linears)
    errors = {
        a: group_error(
            x, linears, smoothing_scale(act_absmax, [lin.weight for lin in linears], a), scheme, act_absmax, reference
        )
        for a in grid
    }
    best = min(errors, key=errors.get)
    return best, errors[best]


def _fold_into_norm(model: nn.Module, norm_name: str, s: torch.Tensor) -> None:
    norm = model.get_submodule(norm_name)
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


@torch.no_grad()
def _convert_group(
    model: nn.Module,
    group: BoundGroup,
    linears: list[nn.Linear],
    s: torch.Tensor | None,
    scheme: str,
    act_absmax: torch.Tensor,
    gptq_inputs: torch.Tensor | None = None,
) -> None:
    fold = s is not None and group.norm is not None
    if fold:
        _fold_into_norm(model, group.norm, s)
    quantized = _quantized_group(linears, s, scheme, act_absmax, prescale=not fold, gptq_inputs=gptq_inputs)
    for name, module in zip(group.linears, quantized):
        set_submodule(model, name, module)


def _smoothing(
    group: BoundGroup, linears: list[nn.Linear], stats: dict, recipe: Recipe, scheme: str
) -> tuple[float | None, torch.Tensor | None, float]:
    """(alpha, s, relative error) for one group under ``recipe``; s is None without smoothing."""
    x, act_absmax = stats[group.key]["sample"], stats[group.key]["absmax"]
    if not recipe.smooth:
        return None, None, group_error(x, linears, None, scheme, act_absmax)
    if recipe.alpha is None:
        alpha, error = search_alpha(x, linears, act_absmax, scheme, recipe.alpha_grid)
        return alpha, smoothing_scale(act_absmax, [lin.weight for lin in linears], alpha), error
    s = smoothing_scale(act_absmax, [lin.weight for lin in linears], recipe.alpha)
    return recipe.alpha, s, group_error(x, linears, s, scheme, act_absmax)


@torch.no_grad()
def quantize_model(
    model: nn.Module, stats: dict[str, dict[str, torch.Tensor]], recipe: Recipe, progress: bool = True
) -> QuantReport:
    """Smooth and convert every group of ``model`` in place, from statistics of the whole model."""
    report = QuantReport()
    desc = "alpha search + convert" if recipe.smooth and recipe.alpha is None else "converting"
    for group in tqdm(all_groups(model), desc=desc, unit="group", disable=not progress):
        quantize_group(model, group, stats, recipe, report)
    return report


@torch.no_grad()
def quantize_group(
    model: nn.Module, group: BoundGroup, stats: dict[str, dict[str, torch.Tensor]], recipe: Recipe, report: QuantReport
) -> None:
    """Smooth and convert one group in place and add it to ``report``; the LM head's group converts the
    embedding too (the head never with static activations: its input range varies most from token to token)."""
    linears = [model.get_submodule(n) for n in group.linears]
    is_head = group.block < 0
    scheme = recipe.head_scheme if is_head else recipe.scheme
    if scheme == "weight_only":  # BF16 activations: nothing to migrate, nothing to fall back from
        alpha, s, fallback = None, None, False
        error = group_error(stats[group.key]["sample"], linears, None, scheme, stats[group.key]["absmax"])
    else:
        alpha, s, error = _smoothing(group, linears, stats, recipe, scheme)
        fallback = recipe.fallback_error is not None and error > recipe.fallback_error
    if fallback:  # INT8 weights without smoothing (nothing to migrate), BF16 activations
        alpha, s, scheme = None, None, "weight_only"
    if is_head:
        quantize_head(model, s, scheme)
    else:
        _convert_group(
            model,
            group,
            linears,
            s,
            scheme,
            stats[group.key]["absmax"],
            stats[group.key]["sample"] if recipe.gptq else None,
        )
    report.groups.append(GroupResult(list(group.linears), alpha, error, fallback))


@torch.no_grad()
def quantize_head(model: nn.Module, s: torch.Tensor | None, scheme: str = "dynamic") -> None:
    """INT8 LM head (smoothed by ``s`` through the final norm) and INT8 embedding table. A tied head
    shares the embedding's INT8 tensors: the table stores ``W * s``, the lookup multiplies by 1/s."""
    family = family_of(model.config.model_type)
    embedding = model.get_submodule(family.embedding)
    head = model.get_submodule(family.lm_head)
    tied = head.weight is embedding.weight
    if s is not None:
        _fold_into_norm(model, family.final_norm, s)
    scaled_head = head.weight.detach().float() * (1 if s is None else s)
    if tied:
        q_embedding = Int8Embedding.from_weight(
            scaled_head, embedding.padding_idx, column_scale=None if s is None else 1.0 / s
        )
        q_head = Int8Linear(
            head.in_features, head.out_features, bias=head.bias is not None, scheme=scheme, smooth=False
        )
        q_head.weight, q_head.weight_scale = q_embedding.weight, q_embedding.weight_scale
        if head.bias is not None:
            q_head.bias = head.bias.detach().float().clone()
    else:
        q_embedding = Int8Embedding.from_weight(embedding.weight.detach().float(), embedding.padding_idx)
        q_head = Int8Linear.from_weight(scaled_head, head.bias, scheme=scheme)
    set_submodule(model, family.embedding, q_embedding)
    set_submodule(model, family.lm_head, q_head)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear SmoothQuant converts."""
    return [name for group in all_groups(model) for name in group.linears]
