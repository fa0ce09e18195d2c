"""The INT8 KV cache's rows (``--kv-cache-dtype int8``): a key's or value's ``D`` values rounded to INT8 with
a scale of its own (its largest magnitude over 127), which follows them as the 4 bytes of an FP32, so that
a row is ``D + 4`` bytes and a kernel finds the scale where it reads the values. Against BF16 it halves
(almost) the bytes attention reads from the cache, the decode steps' largest read after the weights once
several sequences run.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # a row's FP32 scale, after its values


def row_length(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in a cached row of ``head_dim`` values: an INT8 row has its scale's 4 more."""
    return head_dim + (SCALE_BYTES if dtype == torch.int8 else 0)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[..., D]`` (float) as INT8 rows ``[..., D + 4]``: each rounded to nearest by its own scale."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-30) / 127.0
    values = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], -1)


def unpack(rows: torch.Tensor) -> torch.Tensor:
    """INT8 rows ``[..., D + 4]`` as FP32 ``[..., D]``."""
    return rows[..., :-SCALE_BYTES].float() * rows[..., -SCALE_BYTES:].view(torch.float32)


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values ``x`` as a cache of ``dtype`` stores them."""
    return pack(x) if dtype == torch.int8 else x.to(dtype)


def as_float(cache: torch.Tensor) -> torch.Tensor:
    """A cache's keys or values in a floating type: INT8 rows unpacked, others as stored."""
    return unpack(cache) if cache.dtype == torch.int8 else cache
