"""INT8 kernels: quantization error bounds, real integer matmuls, static vs dynamic activations."""

import pytest
import torch
from torch import nn

from quant.int8 import Int8Embedding, Int8Linear, fuse_linears, quantize_per_channel, quantize_rows
from quant.kernels import EAGER_OPS, eager_kernel


def test_per_channel_weight_error_is_within_half_a_step_inside_the_clipped_range():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different ranges
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    inside = w.abs() <= 127 * scale[:, None]
    assert torch.all(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)[inside])
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses its full range


def test_clipping_heavy_tailed_rows_lowers_their_error_below_absmax_rounding():
    torch.manual_seed(0)
    # rare large weights would set a coarse step for the many small ones: clipping them costs less
    w = torch.distributions.Laplace(0.0, 1.0).sample((4, 4096))
    q, scale = quantize_per_channel(w)
    absmax_scale = w.abs().amax(dim=1) / 127
    absmax_error = ((torch.round(w / absmax_scale[:, None]) * absmax_scale[:, None] - w) ** 2).sum(1)
    error = ((q.float() * scale[:, None] - w) ** 2).sum(1)
    assert torch.all(scale < absmax_scale) and torch.all(error < absmax_error)


def test_each_row_is_quantized_on_its_own_whatever_block_it_is_searched_in():
    torch.manual_seed(0)
    w = torch.randn(1100, 48) * torch.logspace(-2, 1, 1100)[:, None]  # more rows than one search block
    q, scale = quantize_per_channel(w)
    for row in (0, 1023, 1024, 1099):
        alone_q, alone_scale = quantize_per_channel(w[row : row + 1])
        assert torch.equal(q[row : row + 1], alone_q) and torch.equal(scale[row : row + 1], alone_scale)


def test_per_token_activation_error_is_within_half_a_step():
    x = torch.randn(8, 32) * torch.tensor([0.01, 1, 100, 5, 0.5, 2, 3, 4])[:, None]
    q, scale = quantize_rows(x)
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-7)


def test_w8a8_linear_matches_float_closely_and_runs_this_cpus_int8_kernel():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=True)
    x = torch.randn(3, 5, 256)
    q = Int8Linear.from_float(linear, scheme="dynamic")
    assert q.weight.dtype == torch.int8
    y, ref = q(x), linear(x)
    assert y.shape == ref.shape
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean())
    assert sqnr > 30, f"SQNR {sqnr:.1f} dB"
    with torch.profiler.profile() as prof:
        q(x)
    names = {e.name for e in prof.events()}
    assert EAGER_OPS[eager_kernel()] in names and not names & {"aten::mm", "aten::addmm", "aten::linear"}


def test_static_scheme_uses_the_calibrated_scale_and_saturates_beyond_it():
    torch.manual_seed(0)
    linear = nn.Linear(16, 4, bias=False)
    x = torch.randn(10, 16)
    scale = float(x.abs().max()) / 127
    static = Int8Linear.from_float(linear, scheme="static", input_scale=scale)
    dynamic = Int8Linear.from_float(linear, scheme="dynamic")
    assert torch.allclose(static(x), linear(x), atol=0.05)
    # 10x out of the calibrated range: static clips, dynamic adapts
    big = x * 10
    assert (static(big) - linear(big)).abs().max() > 10 * (dynamic(big) - linear(big)).abs().max()


def test_smooth_prescale_is_applied_before_quantization():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=False)
    s = torch.rand(16) + 0.5
    x = torch.randn(4, 16)
    scaled = Int8Linear.from_weight(linear.weight * s, None, scheme="dynamic", smooth=1 / s)
    assert torch.allclose(scaled(x), linear(x), atol=0.05)


def test_int8_embedding_looks_up_dequantized_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(100, 16)
    q = Int8Embedding.from_weight(emb.weight)
    ids = torch.tensor([[1, 5, 99]])
    assert torch.allclose(q(ids), emb(ids), atol=emb.weight.abs().max().item() / 127)


@pytest.mark.parametrize("scheme", ["dynamic", "static", "weight_only"])
def test_fused_linears_compute_exactly_the_separate_outputs(scheme):
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    smooth = torch.rand(32) + 0.5
    kwargs = {"input_scale": 0.05} if scheme == "static" else {}
    parts = [Int8Linear.from_float(nn.Linear(32, n), scheme=scheme, smooth=smooth, **kwargs) for n in (16, 8, 8)]
    fused = fuse_linears(parts)
    assert fused.weight.dtype == torch.int8 and fused.out_features == 32
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_linears_with_different_scales_are_not_fused():
    a = Int8Linear.from_float(nn.Linear(8, 8), scheme="static", input_scale=0.1)
    b = Int8Linear.from_float(nn.Linear(8, 8), scheme="static", input_scale=0.2)
    with pytest.raises(ValueError, match="same input"):
        fuse_linears([a, b])
