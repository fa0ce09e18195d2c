"""What the compact decoders (``static_llama``, ``static_mpt``) share: their INT8 layers, and the static KV
cache with the masks that address it.

Positions beyond the current one are masked, so the cache needs no cropping: reusing a prefix is just
writing the new tokens at their positions. The caches are arguments of a step, written in place: the
eager module and the compiled steps share them, and no compiled package carries a copy of them.

The caches have one region (a *slot*) per sequence that may run at once. A prompt or a lone token runs
on one slot (a ``[1, ...]`` view of it); a batched decode step runs one token of every slot together,
each at its own position, so the weights are read once for all of them.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from quant.int8 import Int8Linear, fuse_linears
from quant.kernels import bf16_prompt_gemm, packed_bf16_attention, packed_copies
from server.runtime.attention_op import decode_attention, prompt_attention
from server.runtime.kv_int8 import as_float, row_length, stored


class UnsupportedForCompile(ValueError):
    pass


HEAD_DIM_MULTIPLE = 16  # the compiled decode attention's vectors (``aoti.attention``): AVX-512's 16 floats


def check_head_dim(head_dim: int) -> None:
    if head_dim % HEAD_DIM_MULTIPLE:
        raise UnsupportedForCompile(
            f"no compact decoder for a head dimension of {head_dim} (not a multiple of {HEAD_DIM_MULTIPLE})"
        )


def fused_layer(linears: list[nn.Module], kernel: str | None) -> nn.Module:
    """One layer for linears reading the same input: INT8 ones (the served model) or float ones. INT8 layers
    become views of the fused weight: the model and its compact forms (one per kernel) hold one copy."""
    if all(isinstance(m, Int8Linear) for m in linears):
        fused = fuse_linears(linears)
        for linear, part in zip(linears, fused.weight.split([m.out_features for m in linears])):
            linear.weight = part
        return own_layer(fused, kernel)
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        return fused
    raise UnsupportedForCompile(f"cannot fuse {sorted({type(m).__name__ for m in linears})}")


def own_layer(linear: nn.Module, kernel: str | None) -> nn.Module:
    """The compact model's copy of an INT8 layer (same tensors), computed by ``kernel``, with scales in the
    form inductor's INT8 lowerings take. The weight-only kernel takes a BF16 scale, which eager converts at
    every call: converted once, the frozen graph holds a BF16 constant (inductor cannot lower that
    conversion). A static input scale becomes a 1-element tensor: frozen as a 0-d tensor it folds into a
    scalar constant, which the oneDNN qlinear lowering rejects (it takes a tensor or a Python float)."""
    if not isinstance(linear, Int8Linear):
        return linear
    linear = linear.with_kernel(kernel)
    if linear.scheme == "weight_only":
        linear.weight_scale = linear.weight_scale.to(torch.bfloat16)
    if linear.input_scale is not None:
        linear.input_scale = linear.input_scale.reshape(1)
    return linear


def choose_weight_only_kernels(net: nn.Module) -> None:
    """Set how compiled steps multiply ``net``'s weight-only layers, one choice for the model by the bytes of
    all of them: whether a prompt step converts them to BF16 (``bf16_prompt_gemm``), and whether every step
    reads them as stored, their packed copies (one per step) costing too much (``packed_copies``)."""
    layers = [m for m in net.modules() if isinstance(m, Int8Linear) and m.scheme == "weight_only"]
    total = sum(m.weight.nbytes for m in layers)
    for linear in layers:
        linear.convert_at_prompt, linear.stored_rows = bf16_prompt_gemm(total), not packed_copies(total)


def kv_cache_shape(config, max_len: int) -> tuple[int, int, int, int]:
    """One layer's key (or value) cache: whole attention blocks (``decode_width``) for ``max_len`` positions,
    and one spare position, which keeps every attended slice shorter than the cache, so the compiler keeps its
    length symbolic."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    positions = decode_width(max_len - 1) + 1
    return 1, heads, positions, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys and values ``[B, heads, T, head_dim]`` at positions ``pos``: a prompt's or a token's on
    a one-slot cache (B = 1), or a batched step's one token per slot, each at its own position."""
    k, v = stored(k, k_cache.dtype), stored(v, v_cache.dtype)
    if k.shape[0] == 1:
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
    else:
        slots = torch.arange(k.shape[0])
        k_cache[slots, :, pos] = k[:, :, 0]
        v_cache[slots, :, pos] = v[:, :, 0]


# The KV cache's element types by name (``--kv-cache-dtype``). BF16 halves the bytes a decode step reads
# from the cache (and the memory a long context takes); attention then runs in BF16 with FP32 sums. INT8
# (``kv_int8``) nearly halves them again; attention runs on its values times their rows' scales.
KV_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
DEFAULT_KV_DTYPE = torch.bfloat16


def kv_dtype_for(name: str, config, slots: int, compiled: bool) -> torch.dtype:
    """The KV cache's element type that ``--kv-cache-dtype`` names. ``auto``: INT8 where several sequences
    decode together in compiled steps whose kernels read INT8 rows as stored (the decode kernel's INT16 pairs,
    with AVX-512; q8chat's prompt kernel, without AMX, where prompts attend through ATen's kernel on the rows
    unpacked), BF16 elsewhere. A batched step reads every sequence's cache beside the weights, and halving
    the caches' bytes sped four streams up; one stream decoded no faster, so it keeps BF16's accuracy (INT8
    rows cost a little)."""
    if name != "auto":
        return KV_DTYPES[name]
    if slots == 1 or not compiled or not PROMPT_KERNEL:
        return DEFAULT_KV_DTYPE
    from server.runtime.aoti.attention import int16_dots

    head_dim = kv_cache_shape(config, 2)[3]
    return torch.int8 if int16_dots(torch.float32, torch.int8, torch.int8, head_dim) else DEFAULT_KV_DTYPE


def stored_cache_shape(config, max_len: int, dtype: torch.dtype, slots: int) -> tuple[int, int, int, int]:
    """One layer's key (or value) cache as a tensor: ``slots`` sequences' regions of ``kv_cache_shape``, each
    row as ``dtype`` stores it (``kv_int8.row_length``)."""
    _, heads, positions, head_dim = kv_cache_shape(config, max_len)
    return slots, heads, positions, row_length(head_dim, dtype)


def new_kv_caches(
    config, max_len: int, dtype: torch.dtype = DEFAULT_KV_DTYPE, slots: int = 1, layers: int | None = None
) -> list[torch.Tensor]:
    """Each layer's key cache, then its value cache, zeroed, with ``slots`` sequences' regions: the ``caches``
    argument of a step (of ``layers`` layers; None: the model's)."""
    shape = stored_cache_shape(config, max_len, dtype, slots)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * (layers or config.num_hidden_layers))]


def layer_span(net: nn.Module, layers: range) -> nn.Module:
    """The compact model ``net`` computing only its blocks ``layers``, sharing its tensors: the first span
    embeds token ids, the others take the hidden states ``[B, T, hidden]`` the span before returned, and only
    the last computes logits. Its ``caches`` argument holds its own layers' caches. A large model's steps are
    compiled a span at a time (``aoti.steps``): a build holds several copies of the weights it compiles."""
    span = copy.copy(net)
    for table in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        setattr(span, table, copy.copy(getattr(net, table)))
    span.blocks = nn.ModuleList(net.blocks[layers.start : layers.stop])
    if layers.start > 0:
        span.embed = None
    if layers.stop < len(net.blocks):
        span.norm = span.lm_head = None
    return span


def slot_views(caches: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
    """One slot's region of each cache, shaped as a one-slot cache (a contiguous view)."""
    return [cache[slot : slot + 1] for cache in caches]


def kv_cache_bytes(config, max_len: int, dtype: torch.dtype = DEFAULT_KV_DTYPE, slots: int = 1) -> int:
    """Bytes of all layers' key and value caches for ``max_len`` positions of ``slots`` sequences."""
    return 2 * config.num_hidden_layers * dtype.itemsize * math.prod(stored_cache_shape(config, max_len, dtype, slots))


# Whether compiled prompts attend with q8chat's kernel: read once, outside the traced code (dynamo does not
# trace the CPU's flags)
PROMPT_KERNEL = not packed_bf16_attention()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Attention of queries ``q [B, H, T, D]`` to the cached keys and values ``[B, KV, L, D]`` (``H`` a multiple
    of ``KV``), with ``mask`` (True: attend) or an additive float bias, broadcast to ``[B, H, T, L]``, or None
    (causal); in the cache's type, with FP32 sums.

    Compiled, one query per sequence (a decode step) is ``attention_op.decode_attention``, which a step runs
    as q8chat's kernel: SDPA's flash kernel took several times longer for a lone query (its blocking and
    buffers are made for many). A prompt's queries are ``attention_op.prompt_attention`` where ATen's flash
    kernel has no AMX to multiply BF16 with (``packed_bf16_attention``). Eagerly, SDPA, whose kernel
    materializes no score tensor. An INT8 cache's rows are unpacked for SDPA; the kernels read them as stored."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None and torch.compiler.is_compiling():
        if q.shape[2] == 1:
            return decode_attention(q.to(k.dtype) if k.is_floating_point() else q, k, v, mask, scale)
        if PROMPT_KERNEL:
            return prompt_attention(q, k, v, mask[(None,) * (4 - mask.dim())], scale)
    k, v = as_float(k), as_float(v)
    return F.scaled_dot_product_attention(
        q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def prompt_logits_layer(net: nn.Module, ids: torch.Tensor) -> int | None:
    """The block of ``net`` (a compact model or its last ``layer_span``) to run for a prompt's last position
    alone (``last_query``): its last, where it computes the logits after a prompt (one sequence of several
    tokens); None where every position's output is read (a decode step, an earlier span)."""
    if net.lm_head is None or ids.shape[0] != 1 or ids.shape[1] == 1:
        return None
    return len(net.blocks) - 1


def last_query(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last position's query ``[B, H, 1, D]``, hidden state ``[B, 1, hidden]`` and mask row of a prompt's
    ``q``, ``x`` and ``mask`` (None: causal, its last row attending all ``length`` positions). A prompt's last
    layer, once its keys and values are cached, computes the rest for the last position alone: the logits
    read no other, and no later layer does."""
    row = torch.ones(1, length, dtype=torch.bool) if mask is None else mask[..., -1:, :]
    return q[:, :, -1:], x[:, -1:], row


# A decode step attends a whole number of these blocks of cache positions, the rest masked. SDPA's CPU
# kernel sums a partial last block of keys in another order than a whole one, so a token's attention would
# change in its last bits with the width its batch attends (the farthest sequence's); it does not change
# with whole masked blocks added. So a decode step computes the same for a token whatever it runs with.
# (The compiled steps' kernel sums chunks of whole blocks, and skips masked positions: the same holds.)
ATTENTION_BLOCK = 32


def decode_width(start: int) -> int:
    """The attended width of a decode step for a token at ``start``: its whole blocks (the caches hold whole
    blocks)."""
    return (start // ATTENTION_BLOCK + 1) * ATTENTION_BLOCK


def batch_mask(max_len: int, starts: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and mask of a batched decode step: slot ``i`` adds one token at ``starts[i]`` and attends
    to the cache up to it. An idle slot (None) writes to the spare position, which no mask reaches, and
    attends to position 0 alone (its output is discarded; a row with nothing to attend would be NaN)."""
    live = [start for start in starts if start is not None]
    if any(start >= max_len for start in live):
        raise ValueError(f"positions up to {max(live) + 1} do not fit a cache of {max_len}")
    width = max(decode_width(start) for start in [0, *live])
    pos = np.array([max_len if start is None else start for start in starts], dtype=np.int64)
    reach = np.array([0 if start is None else start for start in starts], dtype=np.int64)
    return torch.from_numpy(pos), visible(np.arange(width), reach)


def attention_mask(max_len: int, start: int, count: int, compiled: bool = False) -> torch.Tensor | None:
    """The mask for ``count`` new tokens at positions ``start...``: each sees the cache up to itself.
    None for several tokens from position 0 (SDPA's causal attention, with no mask tensor to build), unless
    ``compiled``: the compiled steps take a tensor. A single token's mask is ``decode_width`` wide."""
    if start + count > max_len:
        raise ValueError(f"positions up to {start + count} do not fit a cache of {max_len}")
    if start == 0 and count > 1 and not compiled:
        return None
    width = decode_width(start) if count == 1 else start + count
    return visible(np.arange(width), np.arange(start, start + count))


def visible(keys: np.ndarray, queries: np.ndarray) -> torch.Tensor:
    """``[len(queries), len(keys)]``: whether each query position sees each key position (not after it). Built
    in numpy, between steps, where each torch call on a small tensor costs tens of microseconds (a few per cent
    of a small model's decode step)."""
    return torch.from_numpy(keys[None, :] <= queries[:, None])
