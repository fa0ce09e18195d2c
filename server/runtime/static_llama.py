"""A compact Llama decoder over a quantized Hugging Face model, with a preallocated KV cache, made to be
compiled whole (gpt-fast's way).

Hugging Face's modeling code rebuilds masks and caches in Python at every step; here one step is a
plain function of (token ids, positions) that inductor can trace without breaks. The INT8 layers are
the model's own ``Int8Linear`` modules, with q/k/v and gate/up fused into one matmul each: fewer,
larger INT8 GEMMs (oneDNN's small-N shapes are slow, and every call has a fixed cost).

Positions beyond the current one are masked, so the cache needs no cropping: reusing a prefix is
just writing the new tokens at their positions. The caches are arguments of the step, written in place:
the eager module and the compiled steps share them, and no compiled package carries a copy of them.

The caches have one region (a *slot*) per sequence that may run at once. A prompt or a lone token runs
on one slot (a ``[1, ...]`` view of it); a batched decode step runs one token of every slot together,
each at its own position, so the weights are read once for all of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from quant.int8 import Int8Linear, fuse_linears


class UnsupportedForCompile(ValueError):
    pass


def _fuse(linears: list[nn.Module], kernel: str | None) -> nn.Module:
    """One layer for linears reading the same input: INT8 ones (the served model) or float ones."""
    if all(isinstance(m, Int8Linear) for m in linears):
        return _own(fuse_linears(linears), kernel)
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        return fused
    raise UnsupportedForCompile(f"cannot fuse {sorted({type(m).__name__ for m in linears})}")


def _own(linear: nn.Module, kernel: str | None) -> nn.Module:
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


def kv_cache_shape(config, max_len: int) -> tuple[int, int, int, int]:
    """One layer's key (or value) cache: one spare position keeps every attended slice shorter than the
    cache, so the compiler keeps its length symbolic."""
    heads = config.num_key_value_heads
    return 1, heads, max_len + 1, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# The KV cache's element types by name (``--kv-cache-dtype``). BF16 halves the bytes a decode step reads
# from the cache (and the memory a long context takes); attention then runs in BF16 with FP32 sums.
KV_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_KV_DTYPE = torch.bfloat16


def new_kv_caches(config, max_len: int, dtype: torch.dtype = DEFAULT_KV_DTYPE, slots: int = 1) -> list[torch.Tensor]:
    """Each layer's key cache, then its value cache, zeroed, with ``slots`` sequences' regions: the ``caches``
    argument of a step."""
    shape = (slots, *kv_cache_shape(config, max_len)[1:])
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * config.num_hidden_layers)]


def slot_views(caches: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
    """One slot's region of each cache, shaped as a one-slot cache (a contiguous view)."""
    return [cache[slot : slot + 1] for cache in caches]


def kv_cache_bytes(config, max_len: int, dtype: torch.dtype = DEFAULT_KV_DTYPE, slots: int = 1) -> int:
    """Bytes of all layers' key and value caches for ``max_len`` positions of ``slots`` sequences."""
    return slots * 2 * config.num_hidden_layers * dtype.itemsize * math.prod(kv_cache_shape(config, max_len))


# A decode step attends a whole number of these blocks of cache positions, the rest masked. SDPA's CPU
# kernel sums a partial last block of keys in another order than a whole one, so a token's attention would
# change in its last bits with the width its batch attends (the farthest sequence's); it does not change
# with whole masked blocks added. So a decode step computes the same for a token whatever it runs with.
ATTENTION_BLOCK = 16


def decode_width(max_len: int, start: int) -> int:
    """The attended width of a decode step for a token at ``start``: its whole blocks (at least 2 positions,
    what the compiled steps take), within the cache."""
    return min(max_len, max(2, -(-(start + 1) // ATTENTION_BLOCK) * ATTENTION_BLOCK))


def batch_mask(max_len: int, starts: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and mask of a batched decode step: slot ``i`` adds one token at ``starts[i]`` and attends
    to the cache up to it. An idle slot (None) writes to the spare position, which no mask reaches, and
    attends to position 0 alone (its output is discarded; a row with nothing to attend would be NaN)."""
    live = [start for start in starts if start is not None]
    if any(start >= max_len for start in live):
        raise ValueError(f"positions up to {max(live) + 1} do not fit a cache of {max_len}")
    width = max(decode_width(max_len, start) for start in [0, *live])
    pos = torch.tensor([max_len if start is None else start for start in starts])
    reach = torch.tensor([0 if start is None else start for start in starts])
    return pos, torch.arange(width)[None, :] <= reach[:, None]


def attention_mask(max_len: int, start: int, count: int, compiled: bool = False) -> torch.Tensor | None:
    """The mask for ``count`` new tokens at positions ``start...``: each sees the cache up to itself.
    None for several tokens from position 0 (SDPA's causal attention, with no mask tensor to build), unless
    ``compiled``: the compiled steps take a tensor. A single token's mask is ``decode_width`` wide."""
    if start + count > max_len:
        raise ValueError(f"positions up to {start + count} do not fit a cache of {max_len}")
    if start == 0 and count > 1 and not compiled:
        return None
    width = decode_width(max_len, start) if count == 1 else start + count
    return torch.arange(width)[None, :] <= torch.arange(start, start + count)[:, None]


def check_supported(config) -> None:
    """Raise ``UnsupportedForCompile`` unless the compact model computes what this config's model does."""
    if (
        config.model_type != "llama"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or config.hidden_act != "silu"
    ):
        raise UnsupportedForCompile(f"no compact decoder for model type {config.model_type!r}")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticBlock(nn.Module):
    def __init__(self, layer, config, max_len: int, kernel: str | None) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        shape = kv_cache_shape(config, max_len)
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, shape[1], shape[3]
        self.eps = config.rms_norm_eps
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], kernel)
        self.o_proj = _own(attn.o_proj, kernel)
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj], kernel)
        self.down_proj = _own(mlp.down_proj, kernel)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        b, t = x.shape[:2]
        qkv = self.qkv(_rms_norm(x, self.input_norm, self.eps))
        q, k, v = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = _rotate(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if b == 1:
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
        else:  # one token per slot, each at its own position
            slots = torch.arange(b)
            k_cache[slots, :, pos] = k[:, :, 0].to(k_cache.dtype)
            v_cache[slots, :, pos] = v[:, :, 0].to(v_cache.dtype)
        length = t if mask is None else mask.shape[-1]
        att = F.scaled_dot_product_attention(
            q.to(k_cache.dtype),  # in the cache's type: converting the cache instead would read it twice
            k_cache[:, :, :length],
            v_cache[:, :, :length],
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.heads != self.kv_heads,
        ).to(x.dtype)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        gate, up = self.gate_up(_rms_norm(x, self.post_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class StaticLlama(nn.Module):
    """``forward(ids [1, T], pos [T], mask [T, L] or None, caches) -> logits [1, vocab]`` of the last
    position, on one-slot caches; or a batched decode step, ``forward(ids [B, 1], pos [B], mask [B, L],
    caches) -> logits [B, vocab]`` on caches of B slots (``batch_mask``).

    ``caches`` (``new_kv_caches``: each layer's keys, then its values, of a type in ``KV_DTYPES``) get the keys
    and values of positions ``pos``; attention reads the first L cache positions through ``mask`` (True:
    attend), so its cost follows the conversation, not the cache size. Its INT8 layers compute W8A8 products
    by ``kernel`` (``quant.kernels``; None: this CPU's eager one)."""

    def __init__(self, model, max_len: int, kernel: str | None = None) -> None:
        super().__init__()
        config = model.config
        check_supported(config)
        self.config, self.max_len, self.kernel = config, max_len, kernel
        self.embed = model.model.embed_tokens
        self.blocks = nn.ModuleList(StaticBlock(layer, config, max_len, kernel) for layer in model.model.layers)
        self.norm = model.model.norm.weight
        self.eps = config.rms_norm_eps
        self.lm_head = _own(model.lm_head, kernel)
        positions = torch.arange(max_len + 1)[None]  # and the spare position idle slots write to
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.register_buffer("cos", cos[0].float(), persistent=False)
        self.register_buffer("sin", sin[0].float(), persistent=False)

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, caches: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.embed(ids)
        cos, sin = self.cos[pos], self.sin[pos]
        if ids.shape[0] > 1:  # a batched decode step: each slot's own position and mask
            cos, sin, mask = cos[:, None, None], sin[:, None, None], mask[:, None, None]
        elif mask is not None:
            mask = mask[None, None]
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cos, sin, mask, caches[2 * i], caches[2 * i + 1])
        return self.lm_head(_rms_norm(x[:, -1], self.norm, self.eps))
