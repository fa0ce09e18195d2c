"""The compact Llama decoder computes what the Hugging Face model computes, float and INT8."""

import pytest
import torch

from quant.smoothquant import Recipe
from server.runtime.compact import (
    ATTENTION_BLOCK,
    UnsupportedForCompile,
    attention_mask,
    batch_mask,
    new_kv_caches,
)
from server.runtime.static_llama import StaticLlama
from tests.harness import quantized_tiny, tiny_llama, tiny_mpt


def compact_logits(net, ids: list[int], chunks: list[int], kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """Run ``ids`` through the compact model in chunks of the given sizes; logits after each chunk."""
    start, out, caches = 0, [], new_kv_caches(net.config, net.max_len, kv_dtype)
    for size in chunks:
        part = ids[start : start + size]
        mask = attention_mask(net.max_len, start, size)
        out.append(net(torch.tensor([part]), torch.arange(start, start + size), mask, caches)[0])
        start += size
    return out


@torch.no_grad()
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32-kv", "bf16-kv", "int8-kv"])
@pytest.mark.parametrize(
    "recipe",
    [None, Recipe(alpha=None), Recipe(alpha=None, scheme="static"), Recipe(alpha=0.5, fallback_error=0.0)],
    ids=["float", "dynamic", "static", "weight-only"],
)
def test_compact_model_matches_hugging_face_prefill_and_decode(tokenizer, recipe, kv_dtype):
    model = tiny_llama(len(tokenizer))
    if recipe is not None:
        quantized_tiny(model, recipe)
    ids = torch.randint(0, 2000, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = model(input_ids=torch.tensor([ids])).logits[0]
    net = StaticLlama(model, 64).eval()
    # a prompt in one piece, then token by token, as the engine runs it
    chunks = [16] + [1] * 8
    ends = [sum(chunks[: i + 1]) - 1 for i in range(len(chunks))]
    # a BF16 cache rounds keys and values to 8 significant bits: logits of about 1 move by a BF16 step or two;
    # an INT8 one to 1/254 of each row's largest
    atol = {torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.int8: 2e-2}[kv_dtype]
    for logits, end in zip(compact_logits(net, ids, chunks, kv_dtype), ends):
        assert torch.allclose(logits, expected[end], atol=atol, rtol=1e-3), end


def test_attention_mask_sees_each_position_up_to_itself():
    mask = attention_mask(8, 3, 2)
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert attention_mask(8, 0, 4) is None  # a fresh prompt: causal attention without a mask
    with pytest.raises(ValueError):
        attention_mask(8, 7, 2)


def test_a_decode_step_attends_whole_blocks_and_a_batched_one_the_widest_slots():
    block = ATTENTION_BLOCK
    assert attention_mask(64, 0, 1).tolist() == [[True] + [False] * (block - 1)]
    assert attention_mask(64, block, 1).tolist() == [[True] * (block + 1) + [False] * (block - 1)]
    pos, mask = batch_mask(64, [3, None, block + 4])
    assert pos.tolist() == [3, 64, block + 4]  # the idle slot writes to the spare position
    assert mask.tolist() == [
        [True] * 4 + [False] * (2 * block - 4),
        [True] + [False] * (2 * block - 1),
        [True] * (block + 5) + [False] * (block - 5),
    ]


def test_a_cache_holds_whole_blocks_and_a_spare_position():
    """The last position of a context that is not a whole number of blocks still gets a whole block."""
    block, config = ATTENTION_BLOCK, tiny_llama(100).config
    assert new_kv_caches(config, block + 2)[0].shape[2] == 2 * block + 1
    assert attention_mask(block + 2, block + 1, 1).tolist() == [[True] * (block + 2) + [False] * (block - 2)]
    assert new_kv_caches(config, 2 * block)[0].shape[2] == 2 * block + 1


def test_compiled_steps_get_a_mask_tensor():
    assert attention_mask(2, 0, 1, compiled=True).tolist() == [[True] + [False] * (ATTENTION_BLOCK - 1)]
    assert attention_mask(8, 0, 3, compiled=True).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    assert torch.equal(attention_mask(8, 3, 2, compiled=True), attention_mask(8, 3, 2))


def test_other_families_are_refused():
    with pytest.raises(UnsupportedForCompile, match="mpt"):
        StaticLlama(tiny_mpt(100), 8)


@torch.no_grad()
def test_bf16_and_int8_kv_caches_keep_the_default_models_predictions():
    """On real text, the default model decoding on a BF16 or an INT8 cache predicts what it predicts on an FP32
    one."""
    from prompts import heldout_text
    from quant.load import load_float_model

    loaded = load_float_model("default")
    ids = loaded.tokenizer(heldout_text(), add_special_tokens=False).input_ids[:256]
    net, prompt = StaticLlama(loaded.model, len(ids)).eval(), 192
    chunks = [prompt] + [1] * (len(ids) - prompt - 1)  # then decode steps, each reading the cache
    targets = torch.tensor(ids[prompt:])
    runs = {}
    for kv_dtype in (torch.float32, torch.bfloat16, torch.int8):
        logits = torch.stack(compact_logits(net, ids, chunks, kv_dtype))
        runs[kv_dtype] = logits, torch.nn.functional.cross_entropy(logits, targets)
    fp32, fp32_nll = runs.pop(torch.float32)
    for kv_dtype, (logits, nll) in runs.items():
        assert abs(nll - fp32_nll) < 0.02, kv_dtype  # nats per token
        assert (fp32.argmax(-1) == logits.argmax(-1)).sum() >= len(targets) - 4, kv_dtype
