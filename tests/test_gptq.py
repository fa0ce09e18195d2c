"""GPTQ rounding: same scales and INT8 range as round-to-nearest, less output error on real inputs."""

import torch

from quant.gptq import gptq_round
from quant.int8 import quantize_per_channel


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(16, 64)

    def inputs(rows):  # 64 channels driven by 16 factors, as hidden states are: highly correlated
        return torch.randn(rows, 16) @ mixing + 0.1 * torch.randn(rows, 64)

    calibration, w = inputs(1024), torch.randn(32, 64)
    rtn, scale = quantize_per_channel(w)
    q = gptq_round(w, scale, calibration)
    assert q.dtype == torch.int8 and q.abs().max() <= 127

    for x in (calibration, inputs(1024)):  # held-out rows too: not just fitted to the calibration

        def output_error(values):
            return ((x @ (values.float() * scale[:, None]).T - x @ w.T) ** 2).mean()

        assert output_error(q) < 0.3 * output_error(rtn)


def test_dead_input_channels_are_ignored():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] = 0
    w = torch.randn(8, 16)
    _, scale = quantize_per_channel(w)
    q = gptq_round(w, scale, x)
    assert torch.all(q[:, 3] == 0)
