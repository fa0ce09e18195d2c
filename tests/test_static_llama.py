"""The compact Llama decoder computes what the Hugging Face model computes, float and INT8."""

import pytest
import torch

from quant.smoothquant import Recipe
from server.runtime.compact import (
    ATTENTION_BLOCK,
    UnsupportedForCompile,
    attention_mask,
    batch_mask,
    layer_span,
    new_kv_caches,
)
from server.runtime.static_llama import StaticLlama
from server.runtime.static_mpt import StaticMPT
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


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_spans_of_layers_run_one_after_another_compute_the_whole_model(tokenizer, family):
    """A large model's steps are compiled a span of layers at a time: the spans, each on its own layers'
    caches and the hidden states of the one before, give the whole compact model's logits bit for bit, and
    leave the same caches."""
    build, compact = {"llama": (tiny_llama, StaticLlama), "mpt": (tiny_mpt, StaticMPT)}[family]
    model = build(len(tokenizer), layers=5)
    quantized_tiny(model)
    net = compact(model, 64).eval()
    spans = [layer_span(net, layers) for layers in (range(0, 2), range(2, 3), range(3, 5))]
    assert [len(span.blocks) for span in spans] == [2, 1, 2] and len(net.blocks) == 5
    assert spans[0].lm_head is None and spans[1].embed is None and spans[2].embed is None
    assert net.embed is not None and net.lm_head is not None  # the whole model is left as it was
    ids = torch.randint(0, 2000, (1, 12), generator=torch.Generator().manual_seed(1))
    whole, split = new_kv_caches(net.config, 64), new_kv_caches(net.config, 64)
    for start, count in ((0, 11), (11, 1)):  # a prompt, then a token
        args = ids[:, start : start + count], torch.arange(start, start + count), attention_mask(64, start, count)
        expected, x = net(*args, whole), args[0]
        for span, (first, last) in zip(spans, ((0, 2), (2, 3), (3, 5))):
            x = span(x, *args[1:], split[2 * first : 2 * last])
        assert torch.equal(x, expected)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
