"""GPTQ rounding of INT8 weights: round one input column at a time and push each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian ``(X^T X)^-1`` of calibration inputs,
so the layer's output error on real inputs is what is minimised, not each weight's own error.

The per-row scales are chosen beforehand (``quantize_per_channel``) and kept; only the integer values
change. On SmolLM2-135M it takes perplexity from +0.89 % to +0.70 % of float and LAMBADA from -1.1 to
-0.1 points (README, Accuracy).
"""

from __future__ import annotations

import torch

from quant.int8 import QMAX

DAMPING = 0.01  # of the mean diagonal of X^T X: keeps the inverse stable with fewer rows than inputs
BLOCK = 128  # columns whose error is propagated lazily, as one matrix product


@torch.no_grad()
def gptq_round(weight: torch.Tensor, scale: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """INT8 values for ``weight`` [out, in] with per-row ``scale``, given calibration ``inputs`` [rows, in]
    as the layer sees them (after smoothing).

    The work is done on the transposed weight [in, out]: a column of the weight, which every step reads and
    updates, is then a contiguous row (on a CPU, column steps over a row-major 7B weight touch a cache line per
    element and took minutes per layer)."""
    w = weight.detach().float().t().contiguous()
    x = inputs.double()
    hessian = (x.T @ x).float()
    dead = hessian.diagonal() == 0  # inputs never active: their weights do not matter
    hessian[dead, dead] = 1.0
    w[dead] = 0.0
    hessian += torch.eye(len(hessian)) * (DAMPING * hessian.diagonal().mean())
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q = torch.empty_like(w)
    columns = w.shape[0]
    for first in range(0, columns, BLOCK):
        last = min(first + BLOCK, columns)
        block, errors = w[first:last].clone(), torch.empty(last - first, w.shape[1])
        inv = inverse[first:last, first:last]
        for i in range(last - first):
            q[first + i] = torch.round(block[i] / scale).clamp(-QMAX, QMAX)
            error = (block[i] - q[first + i] * scale) / inv[i, i]
            block[i:] -= inv[i, i:, None] * error[None]
            errors[i] = error
        w[last:] -= inverse[first:last, last:].T @ errors
    return q.t().to(torch.int8).contiguous()
