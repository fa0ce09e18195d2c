"""SmoothQuant math: scales, exact invariance of smoothing, the win over naive W8A8 on outlier channels,
and the per-layer alpha search."""

import copy

import pytest
import torch
from torch import nn

from quant.calibrate import collect_activation_stats
from quant.families import bound_groups
from quant.int8 import Int8Linear
from quant.smoothquant import (
    Recipe,
    _convert_group,
    group_error,
    linear_names,
    quantize_model,
    search_alpha,
    smoothing_scale,
    static_input_scale,
)


def test_smoothing_scale_formula():
    act = torch.tensor([8.0, 1.0, 0.5])
    w = [torch.tensor([[2.0, 1.0, 4.0]]), torch.tensor([[1.0, 3.0, 1.0]])]
    s = smoothing_scale(act, w, alpha=0.5)
    w_max = torch.tensor([2.0, 3.0, 4.0])
    assert torch.allclose(s, act.sqrt() / w_max.sqrt())
    assert torch.allclose(smoothing_scale(act, w, 1.0), act)
    assert torch.allclose(smoothing_scale(act, w, 0.0), 1 / w_max)


def test_static_scale_is_the_max_of_the_smoothed_activation():
    act = torch.tensor([8.0, 1.0])
    s = torch.tensor([4.0, 0.25])
    assert static_input_scale(act, s) == pytest.approx(4.0 / 127)
    assert static_input_scale(act, None) == pytest.approx(8.0 / 127)


@torch.no_grad()
def test_smoothing_alone_leaves_float_outputs_unchanged(tiny_model):
    """Fold s into norms and weights, but keep everything float: the logits must not change."""
    model = tiny_model
    ids = torch.randint(0, 1000, (1, 24))
    reference = model(input_ids=ids).logits
    stats = collect_activation_stats(model, linear_names(model), [ids], progress=False)
    for group in bound_groups(model):
        if group.norm is None:
            continue
        linears = [model.get_submodule(n) for n in group.linears]
        s = smoothing_scale(stats[group.key]["absmax"], [lin.weight for lin in linears], 0.5)
        norm = model.get_submodule(group.norm)
        norm.weight.div_(s)
        for lin in linears:
            lin.weight.mul_(s)
    assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_calibration_records_what_each_hooked_layer_and_the_head_see(tiny_model):
    """The head's input is taken from the base model's output (no logits are computed): the same rows a
    hook on the head sees in a whole forward pass."""
    model = tiny_model
    ids = torch.randint(0, 1000, (1, 40))
    names = linear_names(model)
    seen = {}

    def hook(name):
        def record(_module, inputs, _output) -> None:
            seen[name] = inputs[0].reshape(-1, inputs[0].shape[-1])

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    model(input_ids=ids)
    for h in handles:
        h.remove()
    stats = collect_activation_stats(model, names, [ids], sample_rows=40, progress=False)
    for name in names:
        assert torch.equal(stats[name]["absmax"], seen[name].abs().amax(dim=0)), name
        assert stats[name]["sample"].shape == seen[name].shape
        assert torch.equal(stats[name]["sample"].sort(dim=0).values, seen[name].sort(dim=0).values), name


def outlier_layer(seed=0):
    """A linear whose input has a few channels 50x larger than the rest (LLM activation outliers)."""
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64, bias=False)
    x = torch.randn(512, 128)
    x[:, [3, 40, 77]] *= 50
    return linear, x


def sqnr(y, ref):
    return float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()))


@torch.no_grad()
def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    linear, x = outlier_layer()
    absmax = x.abs().amax(0)
    ref = linear(x)
    naive = Int8Linear.from_float(linear, scheme="dynamic")(x)
    s = smoothing_scale(absmax, [linear.weight], 0.5)
    smoothed = Int8Linear.from_weight(linear.weight * s, None, scheme="dynamic", smooth=1 / s)(x)
    assert sqnr(smoothed, ref) > sqnr(naive, ref) + 6, (sqnr(smoothed, ref), sqnr(naive, ref))
    # the per-tensor static scheme suffers most from outliers, and gains the most
    naive_static = Int8Linear.from_float(linear, scheme="static", input_scale=static_input_scale(absmax, None))(x)
    smoothed_static = Int8Linear.from_weight(
        linear.weight * s, None, scheme="static", input_scale=static_input_scale(absmax, s), smooth=1 / s
    )(x)
    assert sqnr(smoothed_static, ref) > sqnr(naive_static, ref) + 10


@torch.no_grad()
def test_alpha_search_returns_the_grid_minimum():
    linear, x = outlier_layer(1)
    absmax = x.abs().amax(0)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    best, error = search_alpha(x, [linear], absmax, "dynamic", grid)
    errors = [group_error(x, [linear], smoothing_scale(absmax, [linear.weight], a), "dynamic", absmax) for a in grid]
    assert error == pytest.approx(min(errors))
    assert best == grid[errors.index(min(errors))]
    assert best > 0  # some smoothing helps with outliers


@torch.no_grad()
def test_norm_fold_and_prescale_give_the_same_quantized_output(tiny_model):
    """Folding 1/s into the norm or keeping it as a pre-scale are the same computation."""
    model = tiny_model
    ids = torch.randint(0, 1000, (1, 24))
    stats = collect_activation_stats(model, linear_names(model), [ids], progress=False)
    group = next(g for g in bound_groups(model) if g.norm is not None)
    linears = [model.get_submodule(n) for n in group.linears]
    absmax = stats[group.key]["absmax"]
    s = smoothing_scale(absmax, [lin.weight for lin in linears], 0.5)
    x = stats[group.key]["sample"]
    expected = torch.cat(
        [Int8Linear.from_weight(lin.weight * s, None, scheme="dynamic", smooth=1 / s)(x) for lin in linears], -1
    )
    folded = copy.deepcopy(model)
    _convert_group(folded, group, [folded.get_submodule(n) for n in group.linears], s, "dynamic", absmax)
    norm = folded.get_submodule(group.norm)
    out = torch.cat([folded.get_submodule(n)(x / s) for n in group.linears], -1)
    assert all(folded.get_submodule(n).smooth is None for n in group.linears)
    assert torch.allclose(out, expected, atol=1e-4)
    assert not torch.equal(norm.weight, model.get_submodule(group.norm).weight)


@torch.no_grad()
@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(alpha=None),
        Recipe(alpha=None, head_scheme="dynamic"),
        Recipe(alpha=0.5, scheme="static"),
        Recipe(smooth=False),
    ],
    ids=lambda r: f"{r.name}-head-{r.head_scheme}",
)
def test_quantized_tiny_model_stays_close_to_float(tiny_model, recipe):
    """Every block group, the tied LM head (smoothed W8A8, or INT8 weights with BF16 activations) and
    the embedding in INT8: logits stay close."""
    model = tiny_model
    batches = [torch.randint(0, 2000, (1, 32)) for _ in range(4)]
    ids = torch.randint(0, 2000, (1, 16))
    reference = model(input_ids=ids).logits
    stats = collect_activation_stats(model, linear_names(model), batches, progress=False)
    report = quantize_model(model, stats, recipe, progress=False)
    assert not report.fallback
    logits = model(input_ids=ids).logits
    assert sqnr(logits, reference) > 20  # random-init logits are near-flat: compare values, not argmax


@torch.no_grad()
def test_fallback_keeps_int8_weights_with_bf16_activations(tiny_model):
    model = tiny_model
    ids = torch.randint(0, 2000, (1, 16))
    reference = model(input_ids=ids).logits
    batches = [torch.randint(0, 2000, (1, 32))]
    stats = collect_activation_stats(model, linear_names(model), batches, progress=False)
    recipe = Recipe(alpha=0.5, fallback_error=0.0, head_scheme="dynamic")
    report = quantize_model(model, stats, recipe, progress=False)
    assert sorted(report.fallback) == sorted(linear_names(model))
    assert all(g.alpha is None for g in report.groups)  # nothing smoothed: nothing to migrate
    for name in report.fallback:
        module = model.get_submodule(name)
        assert isinstance(module, Int8Linear) and module.scheme == "weight_only"
        assert module.weight.dtype == torch.int8 and module.smooth is None
    with torch.profiler.profile() as prof:
        logits = model(input_ids=ids).logits
    names = [e.name for e in prof.events()]
    assert "aten::_weight_int8pack_mm" in names and "aten::_int_mm" not in names
    assert sqnr(logits, reference) > 20


@torch.no_grad()
def test_the_head_keeps_bf16_activations_by_recipe_not_as_a_fallback(tiny_model):
    model = tiny_model
    stats = collect_activation_stats(model, linear_names(model), [torch.randint(0, 2000, (1, 32))], progress=False)
    report = quantize_model(model, stats, Recipe(alpha=None), progress=False)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.scheme == "weight_only" and head.smooth is None and embedding.column_scale is None
    assert head.weight is embedding.weight and head.weight.dtype == torch.int8
    assert report.groups[-1].linears == ["lm_head"] and report.groups[-1].alpha is None
    assert "lm_head" not in report.fallback
