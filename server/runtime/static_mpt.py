"""A compact MPT decoder (MPT-7B-chat, Q8-Chat's model) over a quantized Hugging Face model: the same
static cache, steps and forward signature as ``static_llama``, so it is compiled and served the same way.

MPT has no rotary embedding: ALiBi adds ``slope_h * (key position - query position)`` to each head's
scores. That bias is built once per step, for the attended width, and goes into SDPA as its mask (masked
positions at -inf). Hugging Face's MPT subtracts the distance to the *last* key instead of to the query:
the same scores up to a constant per row, which softmax cancels. q, k and v come from one fused ``Wqkv``
(clamped to ``clip_qkv`` when set); the LayerNorms have no bias; the MLP is ``up_proj``, exact GELU,
``down_proj``; the LM head is tied to the embedding.
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
    last_query,
    own_layer,
    prompt_logits_layer,
    write_kv,
)


def check_mpt(config) -> None:
    """Raise ``UnsupportedForCompile`` unless ``StaticMPT`` computes what this config's model does (Hugging
    Face's MPT, which has no biases and always applies ALiBi)."""
    if config.model_type != "mpt":
        raise UnsupportedForCompile(f"no compact decoder for model type {config.model_type!r}")
    check_head_dim(config.d_model // config.n_heads)


def alibi_slopes(heads: int) -> torch.Tensor:
    """Each head's ALiBi slope, as Hugging Face's ``build_mpt_alibi_tensor`` makes them (bias max 8)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    return -build_mpt_alibi_tensor(heads, 2)[:, 0, 0].float()  # its bias for the key one before the last


class MptBlock(nn.Module):
    def __init__(self, block, config, kernel: str | None) -> None:
        super().__init__()
        attn, ffn = block.attn, block.ffn
        self.heads, self.head_dim = config.n_heads, config.d_model // config.n_heads
        self.scale = attn.softmax_scale
        self.clip = attn.clip_qkv
        self.norm_1, self.norm_2 = block.norm_1, block.norm_2
        self.wqkv = own_layer(attn.Wqkv, kernel)
        self.out_proj = own_layer(attn.out_proj, kernel)
        self.up_proj = own_layer(ffn.up_proj, kernel)
        self.down_proj = own_layer(ffn.down_proj, kernel)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        bias: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The block's output, for the last position alone if ``last_only`` (``last_query``)."""
        b, t = x.shape[:2]
        qkv = self.wqkv(self.norm_1(x))
        if self.clip:
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = (part.view(b, t, self.heads, self.head_dim).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
        write_kv(k_cache, v_cache, pos, k, v)
        length = bias.shape[-1]
        if last_only:
            (q, x, bias), t = last_query(q, x, bias, length), 1
        att = attention(q, k_cache[:, :, :length], v_cache[:, :, :length], bias, self.scale).to(x.dtype)
        x = x + self.out_proj(att.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        h = self.up_proj(self.norm_2(x))
        return x + self.down_proj(F.gelu(h))


class StaticMPT(nn.Module):
    """``StaticLlama``'s interface (see there) for an MPT model: ``forward(ids, pos, mask, caches)`` with
    ``mask`` None for a prompt from position 0, ``[T, L]`` or, for a batched decode step, ``[B, L]``."""

    def __init__(self, model, max_len: int, kernel: str | None = None) -> None:
        super().__init__()
        config = model.config
        check_mpt(config)
        self.config, self.max_len, self.kernel = config, max_len, kernel
        self.hidden_size = config.d_model
        self.embed = model.transformer.wte
        self.blocks = nn.ModuleList(MptBlock(block, config, kernel) for block in model.transformer.blocks)
        self.norm = model.transformer.norm_f
        self.lm_head = own_layer(model.lm_head, kernel)
        self.register_buffer("slopes", alibi_slopes(config.n_heads), persistent=False)
        choose_weight_only_kernels(self)

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, caches: list[torch.Tensor]
    ) -> torch.Tensor:
        x = ids if self.embed is None else self.embed(ids)  # a later ``layer_span``: hidden states
        if mask is None:  # a prompt from position 0: causal
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        keys = torch.arange(mask.shape[-1])
        # [T or B, L] distances; a batched step's rows are its slots, each with its own position
        distance = (keys[None, :] - pos[:, None]).float()
        dtype = caches[0].dtype if caches[0].is_floating_point() else torch.float32  # an INT8 cache's: FP32
        bias = (self.slopes[:, None, None] * distance).masked_fill(~mask, float("-inf")).to(dtype)
        bias = bias[None] if ids.shape[0] == 1 else bias.transpose(0, 1)[:, :, None]  # [1, H, T, L] / [B, H, 1, L]
        last = prompt_logits_layer(self, ids)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, bias, caches[2 * i], caches[2 * i + 1], last_only=i == last)
        if self.lm_head is None:  # a ``layer_span`` before the last
            return x
        return self.lm_head(self.norm(x[:, -1]))
