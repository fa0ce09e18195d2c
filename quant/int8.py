"""INT8 modules: linear layers and an embedding with INT8 weights, run with real integer matmuls.

Weights are symmetric INT8 per output channel, each row's range clipped where that lowers its error.
Activations are quantized to INT8 at run time, either per token (``dynamic``: scale from each row's max)
or per tensor with a scale fixed at calibration (``static``: SmoothQuant-O3, what Q8-Chat used). The
integer product runs in the kernel this CPU computes it exactly and fast with (``quant.kernels``), and only
its result is rescaled to float.

A layer whose activations do not survive INT8 (SmoothQuant's reported fallback) keeps INT8 weights
but BF16 activations (``weight_only``: ``torch._weight_int8pack_mm``), so it costs no extra memory. A
compiled prompt step (its row count symbolic) on a CPU with native BF16 multiplies those by the INT8 values
converted to BF16 instead (``convert_at_prompt``, set by ``bf16_prompt_gemm``): the same exact products and FP32
sums through oneDNN's BF16 GEMM, several times faster than ``_weight_int8pack_mm`` at hundreds of rows. With
AMX, inductor's INT8-weight template multiplies them faster still, from a packed copy of its own: taken unless
a model's weight-only layers are too large for such copies (``stored_rows``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from quant.kernels import REFERENCE, check_kernel, eager_kernel, w8a8_matmul

SCHEMES = ("dynamic", "static")  # W8A8 activation schemes a recipe can ask for
LINEAR_SCHEMES = SCHEMES + ("weight_only",)  # ... plus the fallback
QMAX = 127.0
CLIP_RATIOS = tuple(round(1 - 0.02 * i, 2) for i in range(26))  # weight range clipping: 1.00 .. 0.50
WEIGHT_ROUNDING = "per-row mse clip"  # recorded in recipes: a change of rounding invalidates cached checkpoints
_EPS = 1e-8


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row (output channel). Returns (int8 weight, float32 scale per row).

    Each row's range is its max |w| times the ratio of ``CLIP_RATIOS`` with the least squared error:
    a few outlier weights would otherwise coarsen the step for the whole row, and clipping them costs
    less than rounding everything else more coarsely. Rows are searched a block at a time, in place, so the
    block stays in cache across the ratios (a 28 MB LM head took 10 s when every ratio streamed it whole).
    """
    w = weight.detach().float()
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    for first in range(0, w.shape[0], _CLIP_SEARCH_ROWS):
        rows = slice(first, first + _CLIP_SEARCH_ROWS)
        scale[rows] = _least_error_scale(w[rows])
        q[rows] = _round(w[rows], scale[rows])
    return q, scale


_CLIP_SEARCH_ROWS = 1024


def _least_error_scale(w: torch.Tensor) -> torch.Tensor:
    absmax = w.abs().amax(dim=1).clamp(min=_EPS)
    scale, error = absmax / QMAX, torch.full_like(absmax, float("inf"))
    residual = torch.empty_like(w)
    for ratio in CLIP_RATIOS:
        candidate = absmax * (ratio / QMAX)
        torch.div(w, candidate[:, None], out=residual)
        residual.round_().clamp_(-QMAX, QMAX).mul_(candidate[:, None]).sub_(w)
        candidate_error = residual.square_().sum(dim=1)
        better = candidate_error < error
        scale, error = torch.where(better, candidate, scale), torch.where(better, candidate_error, error)
    return scale


def _round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale[:, None]).clamp(-QMAX, QMAX)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic INT8: each row gets its own scale. x is 2-D float."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / QMAX
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8), scale


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor static INT8 with a calibrated scale; values beyond the calibrated range saturate."""
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)


class Int8Linear(nn.Module):
    """Linear layer with INT8 weights and INT8 activations (W8A8), or BF16 ones (``weight_only``).

    ``smooth`` (optional) holds 1/s of SmoothQuant for layers with no preceding norm to fold it into;
    it multiplies the input before activation quantization. ``kernel`` (not saved) picks the W8A8 kernel
    of ``quant.kernels``; None: this CPU's for eager use. Not saved either, a compact model's choice for all
    its weight-only layers (``compact.choose_weight_only_kernels``): ``convert_at_prompt``, a compiled prompt
    step multiplies this layer by its weights converted to BF16, not by ``_weight_int8pack_mm``;
    ``stored_rows``, every compiled step reads its weights as stored (``aoti.weight_only``).
    """

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, scheme: str, smooth: bool, device=None
    ) -> None:
        super().__init__()
        if scheme not in LINEAR_SCHEMES:
            raise ValueError(f"unknown activation scheme {scheme!r}; expected one of {LINEAR_SCHEMES}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.kernel: str | None = None
        self.convert_at_prompt = self.stored_rows = False
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.register_buffer("input_scale", torch.empty((), device=device) if scheme == "static" else None)
        self.register_buffer("smooth", torch.empty(in_features, device=device) if smooth else None)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, scheme: str, input_scale: float | None = None, smooth: torch.Tensor | None = None
    ) -> "Int8Linear":
        return cls.from_weight(linear.weight, linear.bias, scheme=scheme, input_scale=input_scale, smooth=smooth)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        scheme: str,
        input_scale: float | None = None,
        smooth: torch.Tensor | None = None,
    ) -> "Int8Linear":
        """Quantize a float weight [out, in]. For ``static``, ``input_scale`` is max|input| / 127 from
        calibration (of the input after ``smooth`` is applied)."""
        if scheme == "static" and input_scale is None:
            raise ValueError("the static scheme needs a calibrated input_scale")
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=bias is not None, scheme=scheme, smooth=smooth is not None)
        module.weight, module.weight_scale = quantize_per_channel(weight)
        if bias is not None:
            module.bias = bias.detach().float().clone()
        if scheme == "static":
            module.input_scale = torch.tensor(float(input_scale), dtype=torch.float32)
        if smooth is not None:
            module.smooth = smooth.detach().float().clone()
        return module

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in] float32 -> [tokens, out] float32."""
        if self.scheme == "weight_only":
            x_bf16, scale_bf16 = x2.to(torch.bfloat16), self.weight_scale.to(torch.bfloat16)
            if self.kernel == REFERENCE:  # the same products and FP32 sums, by FP32 BLAS: fast at many rows
                return F.linear(x_bf16.float(), self.weight.float()) * scale_bf16.float()
            if self.convert_at_prompt and torch.compiler.is_compiling() and isinstance(x2.shape[0], torch.SymInt):
                return F.linear(x_bf16, self.weight.to(torch.bfloat16)).float() * scale_bf16.float()
            return torch._weight_int8pack_mm(x_bf16, self.weight, scale_bf16).float()
        if self.input_scale is None:
            xq, x_scale = quantize_rows(x2)
        else:
            x_scale = self.input_scale
            xq = quantize_tensor(x2, x_scale)
        return w8a8_matmul(xq, self.weight, self.kernel or eager_kernel()) * x_scale * self.weight_scale

    def with_kernel(self, kernel: str | None) -> "Int8Linear":
        """This layer on the same tensors, computed by ``kernel``: what a compiled step changes of a layer
        (kernel, scale dtypes) stays off the model it came from."""
        clone = copy.copy(self)
        clone._buffers, clone._parameters = dict(self._buffers), dict(self._parameters)
        clone.kernel = None if kernel is None else check_kernel(kernel)
        return clone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth is not None:
            x2 = x2 * self.smooth
        y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
            f"smooth={self.smooth is not None}, bias={self.bias is not None}"
        )


def fuse_linears(linears: list[Int8Linear]) -> Int8Linear:
    """One Int8Linear computing ``cat([l(x) for l in linears], -1)``: layers reading the same input
    (q/k/v, gate/up) as one larger INT8 matmul. Exact: per-channel weight scales and per-token (or
    shared static) activation scales are unchanged by stacking output channels."""
    first = linears[0]
    for other in linears[1:]:
        same = (
            other.in_features == first.in_features
            and other.scheme == first.scheme
            and (other.bias is None) == (first.bias is None)
            and _same(other.smooth, first.smooth)
            and _same(other.input_scale, first.input_scale)
        )
        if not same:
            raise ValueError("only INT8 linears with the same input, scheme and scales can be fused")
    fused = Int8Linear(
        first.in_features,
        sum(m.out_features for m in linears),
        bias=first.bias is not None,
        scheme=first.scheme,
        smooth=first.smooth is not None,
    )
    fused.weight = stack_rows([m.weight for m in linears])
    fused.weight_scale = torch.cat([m.weight_scale for m in linears])
    if first.bias is not None:
        fused.bias = torch.cat([m.bias for m in linears])
    fused.input_scale, fused.smooth = first.input_scale, first.smooth
    return fused


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)`` of contiguous 2-d blocks, as a view where they already lie one after another in
    one storage (layers an earlier fusion left as views of its result): no second copy of the weights."""
    first = tensors[0]
    adjacent = all(
        t.is_contiguous() and t.dim() == 2 and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in tensors
    ) and all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(tensors, tensors[1:]))
    if not adjacent:
        return torch.cat(tensors)
    return first.as_strided((sum(t.shape[0] for t in tensors), first.shape[1]), (first.shape[1], 1))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class Int8Embedding(nn.Module):
    """Embedding table stored as INT8 rows with one scale per row; rows are dequantized on lookup.

    With tied word embeddings the LM head is a ``Int8Linear`` sharing these very tensors. When that
    head is smoothed, the shared table holds ``W * s`` and ``column_scale`` (1/s) restores ``W`` here.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        column_scale: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, device=device))
        self.register_buffer("column_scale", torch.empty(embedding_dim, device=device) if column_scale else None)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, padding_idx: int | None = None, column_scale: torch.Tensor | None = None
    ) -> "Int8Embedding":
        module = cls(*weight.shape, padding_idx, column_scale=column_scale is not None)
        module.weight, module.weight_scale = quantize_per_channel(weight)
        if column_scale is not None:
            module.column_scale = column_scale.detach().float().clone()
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).float() * self.weight_scale[ids].unsqueeze(-1)
        return rows if self.column_scale is None else rows * self.column_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"
