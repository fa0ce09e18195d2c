"""Where each supported model family keeps the layers SmoothQuant touches.

One table instead of per-architecture branches: a family lists its decoder blocks and, per block, the
smoothing groups: linears sharing one input, with the norm in front of them when there is one (1/s is
folded into that norm) or none (1/s stays as a pre-scale inside the INT8 layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class SmoothGroup:
    norm: str | None  # path inside a block, or None when no norm precedes the linears
    linears: tuple[str, ...]  # paths inside a block; all read the same input


@dataclass(frozen=True)
class Family:
    blocks: str  # path of the ModuleList of decoder blocks
    groups: tuple[SmoothGroup, ...]
    embedding: str
    final_norm: str  # the norm in front of the LM head
    lm_head: str
    context: str  # the config attribute with the longest sequence the model was trained for
    chat_format: str  # the built-in template (prompts) of its chat models when they ship none of their own


FAMILIES: dict[str, Family] = {
    # Llama, Vicuna, SmolLM2
    "llama": Family(
        blocks="model.layers",
        groups=(
            SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            SmoothGroup(None, ("self_attn.o_proj",)),
            SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            SmoothGroup(None, ("mlp.down_proj",)),
        ),
        embedding="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        context="max_position_embeddings",
        chat_format="vicuna",  # Vicuna v1.1; Llama chat models with a template of their own use theirs
    ),
    # MPT-7B-chat, the Q8-Chat model
    "mpt": Family(
        blocks="transformer.blocks",
        groups=(
            SmoothGroup("norm_1", ("attn.Wqkv",)),
            SmoothGroup(None, ("attn.out_proj",)),
            SmoothGroup("norm_2", ("ffn.up_proj",)),
            SmoothGroup(None, ("ffn.down_proj",)),
        ),
        embedding="transformer.wte",
        final_norm="transformer.norm_f",
        lm_head="lm_head",
        context="max_seq_len",
        chat_format="chatml",  # MPT-7B-chat's
    ),
}


class UnsupportedModel(ValueError):
    pass


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def context_window(config) -> int:
    """The longest sequence a model of this config was trained for."""
    return int(getattr(config, family_of(config.model_type).context))


@dataclass(frozen=True)
class BoundGroup:
    """A smoothing group of one concrete block, with full module names."""

    block: int
    norm: str | None
    linears: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.linears[0]


def bound_groups(model: nn.Module) -> list[BoundGroup]:
    """Every smoothing group of the model, block by block."""
    family = family_of(model.config.model_type)
    blocks = model.get_submodule(family.blocks)
    groups = []
    for i in range(len(blocks)):
        prefix = f"{family.blocks}.{i}."
        for g in family.groups:
            groups.append(
                BoundGroup(
                    block=i,
                    norm=prefix + g.norm if g.norm else None,
                    linears=tuple(prefix + name for name in g.linears),
                )
            )
    return groups


def head_group(model: nn.Module) -> BoundGroup:
    """The LM head with the final norm in front of it (smoothed like a block group; with tied
    embeddings the embedding lookup undoes the scale, see ``quantize_head``)."""
    family = family_of(model.config.model_type)
    return BoundGroup(block=-1, norm=family.final_norm, linears=(family.lm_head,))


def all_groups(model: nn.Module) -> list[BoundGroup]:
    """Every group SmoothQuant converts: the blocks' groups, then the LM head."""
    return bound_groups(model) + [head_group(model)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
