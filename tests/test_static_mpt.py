"""The compact MPT decoder computes what the Hugging Face MPT computes (ALiBi, fused clipped Wqkv, bias-free
LayerNorms, GELU MLP), eagerly and compiled."""

import pytest
import torch

from quant.smoothquant import Recipe
from server.runtime.aoti import steps as compiled_step
from server.runtime.decoders import HFDecoder, make_decoder
from server.runtime.static_mpt import StaticMPT, alibi_slopes
from tests.harness import quantized_tiny, tiny_mpt
from tests.test_static_llama import compact_logits


def test_alibi_slopes_are_mpts_for_any_head_count():
    assert torch.allclose(alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    # not a power of two: MPT interleaves the slopes of the next power of two
    assert torch.allclose(alibi_slopes(3), torch.tensor([2.0**-4, 2.0**-8, 2.0**-2]))


@torch.no_grad()
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32-kv", "bf16-kv", "int8-kv"])
@pytest.mark.parametrize(
    "recipe", [None, Recipe(alpha=None), Recipe(alpha=None, scheme="static")], ids=["float", "dynamic", "static"]
)
@pytest.mark.parametrize("clip_qkv", [None, 0.05], ids=["unclipped", "clipped"])
def test_compact_mpt_matches_hugging_face_prefill_and_decode(tokenizer, recipe, kv_dtype, clip_qkv):
    model = tiny_mpt(len(tokenizer))
    for block in model.transformer.blocks:
        block.attn.clip_qkv = clip_qkv  # small enough to clip some of the random model's q, k and v
    if recipe is not None:
        quantized_tiny(model, recipe)
    ids = torch.randint(0, 2000, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = model(input_ids=torch.tensor([ids])).logits[0]
    net = StaticMPT(model, 64).eval()
    chunks = [10, 6] + [1] * 8  # a prompt in two chunks (the second attends the first), then token by token
    ends = [sum(chunks[: i + 1]) - 1 for i in range(len(chunks))]
    # BF16 rounds keys, values and the ALiBi bias; INT8 keys and values to 1/254 of each row's largest
    atol = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.int8: 3e-2}[kv_dtype]
    for logits, end in zip(compact_logits(net, ids, chunks, kv_dtype), ends, strict=True):
        assert torch.allclose(logits, expected[end], atol=atol, rtol=1e-3), end


def greedy_logits(decoder, prompt: list[int], count: int, slot: int = 0, tokens: list[int] | None = None) -> list:
    """The logits of ``count`` steps after ``prompt``, decoded one by one as the engine does: each step feeds the
    greedy token of the last, or ``tokens``' (another decoder's choices, to compare the two step by step)."""
    logits = [decoder.forward(prompt, 0, slot)]
    for i in range(count - 1):
        token = int(logits[-1].argmax()) if tokens is None else tokens[i]
        logits.append(decoder.forward([token], len(prompt) + i, slot))
    return logits


@torch.no_grad()
def test_the_compiled_mpt_decodes_the_eager_mpts_tokens(tmp_path, tokenizer):
    """The three steps compiled for a quantized MPT: on fixed prompts, greedy decoding by the Hugging Face model
    gives logits that the compiled steps' follow closely, and the same token at every step that HF's own
    logits decide by more than the two differ (this random model's logits tie now and then); the batched
    step gives each sequence what it computes alone."""
    model = tiny_mpt(len(tokenizer), seed=3)
    quantized_tiny(model)
    packages = compiled_step.package_paths(tmp_path, tmp_path, 64, dict.fromkeys(compiled_step.STEPS, "s8s8"), slots=2)
    compiled = make_decoder(lambda: model, model.config, 64, packages, slots=2)
    assert compiled.description.startswith("compiled decode step and prefill step and batch step")
    prompts = [torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 19)]
    decided = 0
    for slot, prompt in enumerate(prompts):
        expected = greedy_logits(HFDecoder(model), prompt, 12)
        tokens = [int(logits.argmax()) for logits in expected]
        for step, (got, want) in enumerate(zip(greedy_logits(compiled, prompt, 12, slot, tokens), expected)):
            difference, (first, second) = (got - want).abs().max(), want.topk(2).values
            assert difference < 0.1 * want.std(), (slot, step)
            if first - second > 2 * difference:
                decided += 1
                assert int(got.argmax()) == tokens[step], (slot, step)
    assert decided >= 16  # of 24 steps
    alone = [compiled.forward([5 + slot], len(prompt) + 11, slot) for slot, prompt in enumerate(prompts)]
    batched = compiled.decode([5, 6], [len(prompt) + 11 for prompt in prompts], [0, 1])
    for row, expected in zip(batched, alone, strict=True):
        assert (row - expected).abs().max() < 0.05 * expected.std()
