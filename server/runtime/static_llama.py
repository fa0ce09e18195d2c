"""A compact Llama decoder over a quantized Hugging Face model, with a preallocated KV cache, made to be
compiled whole (gpt-fast's way).

Hugging Face's modeling code rebuilds masks and caches in Python at every step; here one step is a
plain function of (token ids, positions) that inductor can trace without breaks. The INT8 layers are
the model's own ``Int8Linear`` modules, with q/k/v and gate/up fused into one matmul each: fewer,
larger INT8 GEMMs (oneDNN's small-N shapes are slow, and every call has a fixed cost). The cache and
its masks are ``compact``'s.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from server.runtime.compact import (
    UnsupportedForCompile,
    attention,
    check_head_dim,
    choose_weight_only_kernels,
    fused_layer,
    kv_cache_shape,
    last_query,
    own_layer,
    prompt_logits_layer,
    write_kv,
)


def check_llama(config) -> None:
    """Raise ``UnsupportedForCompile`` unless ``StaticLlama`` computes what this config's model does."""
    if (
        config.model_type != "llama"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or config.hidden_act != "silu"
    ):
        raise UnsupportedForCompile(f"no compact decoder for model type {config.model_type!r}")
    check_head_dim(kv_cache_shape(config, 1)[3])


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
        self.qkv = fused_layer([attn.q_proj, attn.k_proj, attn.v_proj], kernel)
        self.o_proj = own_layer(attn.o_proj, kernel)
        self.gate_up = fused_layer([mlp.gate_proj, mlp.up_proj], kernel)
        self.down_proj = own_layer(mlp.down_proj, kernel)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The layer's output, for the last position alone if ``last_only`` (``last_query``)."""
        b, t = x.shape[:2]
        qkv = self.qkv(_rms_norm(x, self.input_norm, self.eps))
        q, k, v = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = _rotate(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        write_kv(k_cache, v_cache, pos, k, v)
        length = t if mask is None else mask.shape[-1]
        if last_only:
            (q, x, mask), t = last_query(q, x, mask, length), 1
        att = attention(q, k_cache[:, :, :length], v_cache[:, :, :length], mask).to(x.dtype)
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
    by ``kernel`` (``quant.kernels``; None: this CPU's eager one). A ``compact.layer_span`` of it computes some
    of its blocks."""

    def __init__(self, model, max_len: int, kernel: str | None = None) -> None:
        super().__init__()
        config = model.config
        check_llama(config)
        self.config, self.max_len, self.kernel = config, max_len, kernel
        self.hidden_size = config.hidden_size
        self.embed = model.model.embed_tokens
        self.blocks = nn.ModuleList(StaticBlock(layer, config, max_len, kernel) for layer in model.model.layers)
        self.norm = model.model.norm.weight
        self.eps = config.rms_norm_eps
        self.lm_head = own_layer(model.lm_head, kernel)
        positions = torch.arange(max_len + 1)[None]  # and the spare position idle slots write to
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.register_buffer("cos", cos[0].float(), persistent=False)
        self.register_buffer("sin", sin[0].float(), persistent=False)
        choose_weight_only_kernels(self)

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, caches: list[torch.Tensor]
    ) -> torch.Tensor:
        x = ids if self.embed is None else self.embed(ids)  # a later ``layer_span``: hidden states
        cos, sin = self.cos[pos], self.sin[pos]
        if ids.shape[0] > 1:  # a batched decode step: each slot's own position and mask
            cos, sin, mask = cos[:, None, None], sin[:, None, None], mask[:, None, None]
        elif mask is not None:
            mask = mask[None, None]
        last = prompt_logits_layer(self, ids)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cos, sin, mask, caches[2 * i], caches[2 * i + 1], last_only=i == last)
        if self.lm_head is None:  # a ``layer_span`` before the last
            return x
        return self.lm_head(_rms_norm(x[:, -1], self.norm, self.eps))
