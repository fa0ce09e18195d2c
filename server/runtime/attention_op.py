"""q8chat's attention operators, so that a compiled step runs them as q8chat's own C++ kernels
(``server.runtime.aoti.attention``): ``q8chat::decode_attention``, one query per sequence and head against its
cached keys and values, rather than the loops inductor writes for its parts; ``q8chat::prompt_attention``, a
prompt's queries, rather than ATen's flash attention, whose BF16 products go through a generic GEMM on CPUs
without AMX.

Eagerly (and where no step is compiled) they are SDPA; the kernels compute the same attention with FP32 sums.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from server.runtime.kv_int8 import as_float


@torch.library.custom_op("q8chat::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of queries ``q [B, H, 1, D]`` to keys and values ``[B, KV, L, D]`` (``H`` a multiple of
    ``KV``), with ``mask`` (True: attend) or an additive bias (-inf: masked), broadcast from ``[B or 1, H or
    1, 1, L]``; FP32 ``[B, H, 1, D]``. A row attends to at least one position. (INT8 keys and values:
    ``kv_int8``'s rows, ``[B, KV, L, D + 4]``, and FP32 queries.)"""
    k, v = as_float(k), as_float(v)
    return F.scaled_dot_product_attention(
        q.to(k.dtype), k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    ).float()


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("q8chat::prompt_attention", mutates_args=())
def prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of a prompt's FP32 queries ``q [B, H, T, D]`` to keys and values ``[B, KV, L, D]`` (``H`` a
    multiple of ``KV``), with ``mask`` (True: attend) or an additive bias (-inf: masked), broadcast from
    ``[B or 1, H or 1, T, L]``; FP32 ``[B, H, T, D]``. A row attends to at least one position. (INT8 keys and
    values: ``kv_int8``'s rows.)"""
    return F.scaled_dot_product_attention(
        q,
        as_float(k).float(),
        as_float(v).float(),
        attn_mask=mask if mask.dtype == torch.bool else mask.float(),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


@prompt_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32)
