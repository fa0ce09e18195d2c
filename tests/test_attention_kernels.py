"""q8chat's attention kernels, compiled by inductor, against SDPA. The decode kernel: grouped queries, a
batched step's slots each with its own reach, MPT's additive ALiBi bias, fused pointwise consumers, and a
sequence's result the same whatever its batch attends. The prompt kernel: a prompt from position 0 and one
continuing a cached prefix, with lengths that fill no whole block, and ALiBi. Both on BF16, FP32 and INT8
caches."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.cpu_vec_isa import pick_vec_isa
from torch._inductor.utils import run_and_get_code
from transformers import LlamaConfig

from quant.kernels import packed_bf16_attention
from server.runtime.aoti import attention as attention_kernel
from server.runtime.attention_op import decode_attention, prompt_attention
from server.runtime.compact import ATTENTION_BLOCK, attention, attention_mask, kv_dtype_for
from server.runtime.kv_int8 import as_float, stored

MARK = "q8chat::decode_attention"  # a comment in each kernel's source
PROMPT_MARK = "q8chat::prompt_attention"


def cache_of(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Random keys and values ``[2, *shape]`` as a cache of ``dtype`` stores them (INT8: ``kv_int8``'s rows)."""
    return stored(torch.randn(2, *shape), dtype)


def inputs(heads: int, kv_heads: int, reach: list[int], width: int, bias: bool, dim: int = 64, dtype=torch.bfloat16):
    """A decode step's queries (in the type ``attention`` gives the kernel), cache slices and mask."""
    torch.manual_seed(0)
    slots = len(reach)
    q = torch.randn(slots, heads, 1, dim).to(dtype if dtype.is_floating_point else torch.float32)
    cache = cache_of(dtype, slots, kv_heads, width + 7, dim)  # longer: the step's slices
    k, v = cache[0, :, :, :width], cache[1, :, :, :width]
    mask = (torch.arange(width)[None, :] <= torch.tensor(reach)[:, None])[:, None, None]  # [B, 1, 1, L]
    if bias:
        slopes = torch.rand(heads)[None, :, None, None]
        mask = (slopes * (torch.arange(width) - reach[0])).masked_fill(~mask, float("-inf")).to(q.dtype)
    return q, k, v, mask


def compiled(fn, *args, mark: str = MARK):
    attention_kernel.register()
    torch._dynamo.reset()
    result, sources = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    assert any(mark in source for source in sources), "the op was not lowered to q8chat's kernel"
    return result


BATCH = (6, 2, [3 * ATTENTION_BLOCK - 8, 3, ATTENTION_BLOCK + 5], False)  # slots reaching apart, grouped heads
ALIBI = (4, 4, [90, 40], True)  # an additive bias


def width_of(reach: list[int]) -> int:
    return max(r // ATTENTION_BLOCK + 1 for r in reach) * ATTENTION_BLOCK


@torch.no_grad()
@pytest.mark.parametrize(
    "heads, kv_heads, reach, bias", [(9, 3, [600], False), BATCH, ALIBI], ids=["gqa", "batch", "alibi"]
)
def test_the_kernel_computes_sdpas_attention(heads, kv_heads, reach, bias):
    q, k, v, mask = inputs(heads, kv_heads, reach, width_of(reach), bias)
    expected = decode_attention(q, k, v, mask, 0.125)  # eagerly: SDPA
    result = compiled(lambda *a: attention(*a, 0.125), q, k, v, mask)
    assert result.shape == expected.shape and result.dtype == torch.float32
    # SDPA rounds its BF16 output, the kernel keeps FP32
    torch.testing.assert_close(result, expected, atol=1e-2, rtol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("heads, kv_heads, reach, bias", [BATCH, ALIBI], ids=["batch", "alibi"])
def test_decode_attention_on_an_int8_cache_is_fp32_attention_to_the_rounding_of_query_and_weights(
    heads, kv_heads, reach, bias
):
    """Where inductor writes AVX-512 code, each head's scaled query and each chunk's softmax weights (times their
    values' scales) are rounded to INT16 of their largest magnitude, and the products summed exactly
    (``int16_dots``); elsewhere all in FP32. Against SDPA on the rows unpacked, in FP32."""
    q, k, v, mask = inputs(heads, kv_heads, reach, width_of(reach), bias, dtype=torch.int8)
    expected = decode_attention(q, k, v, mask, 0.125)
    attention_kernel.register()
    torch._dynamo.reset()
    step = torch.compile(lambda *a: attention(*a, 0.125), fullgraph=True, dynamic=False)
    result, sources = run_and_get_code(step, q, k, v, mask)
    int16 = any(MARK in source and re.search(r"#define \w+_INT16_DOTS", source) for source in sources)
    assert int16 == attention_kernel.int16_dots(q.dtype, k.dtype, v.dtype, 64)
    if int16:  # each weight within 2**-16 of the chunk's largest, each query element of the head's
        torch.testing.assert_close(result, expected, atol=2**-12 * as_float(v).abs().max(), rtol=0)
    else:
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_the_default_kv_cache_is_int8_only_for_compiled_batches_the_int16_kernel_reads():
    """``--kv-cache-dtype auto``: INT8 where several slots decode in compiled steps and q8chat's kernels read INT8
    rows as stored (the decode kernel's INT16 pairs: inductor's AVX-512 code, whole vectors of 32 depths; the
    prompt kernel: no AMX); BF16 for one slot, eager steps, other head sizes and CPUs. A name given is the type
    used."""
    llama = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)  # the default model's heads
    odd = LlamaConfig(hidden_size=432, num_attention_heads=9, num_key_value_heads=3)  # 48 depths a head
    int8_read = str(pick_vec_isa()).startswith("avx512") and not packed_bf16_attention()
    assert kv_dtype_for("auto", llama, 4, compiled=True) == (torch.int8 if int8_read else torch.bfloat16)
    assert kv_dtype_for("auto", llama, 1, compiled=True) == torch.bfloat16
    assert kv_dtype_for("auto", llama, 4, compiled=False) == torch.bfloat16
    assert kv_dtype_for("auto", odd, 4, compiled=True) == torch.bfloat16
    assert kv_dtype_for("fp32", llama, 4, compiled=True) == torch.float32
    assert kv_dtype_for("int8", llama, 1, compiled=False) == torch.int8


@torch.no_grad()
def test_decode_attention_on_a_bf16_cache_is_fp32_attention_to_the_rounding_of_its_weights():
    """Where the CPU has AVX512_BF16, BF16 queries (as ``attention`` gives them), keys and values multiply as they
    are, in BF16 pairs (``vdpbf16ps``, each product exact in FP32), and the softmax weights are rounded to BF16
    (2**-9 each); elsewhere all in FP32, as close to FP32 attention on the same values as FP32 sums get."""
    q, k, v, mask = inputs(9, 3, [600], 640, False)
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.125, enable_gqa=True
    )
    attention_kernel.register()
    torch._dynamo.reset()
    step = torch.compile(lambda *a: attention(*a, 0.125), fullgraph=True, dynamic=False)
    result, sources = run_and_get_code(step, q, k, v, mask)
    pairs = any(MARK in source and re.search(r"#define \w+_BF16_PAIRS", source) for source in sources)
    assert pairs == attention_kernel.bf16_products(k.dtype, v.dtype, 64)
    tolerance = 2**-9 * v.float().abs().max() if pairs else 1e-5
    torch.testing.assert_close(result, expected, atol=tolerance, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_a_sequences_attention_does_not_depend_on_its_batch(dtype):
    """Bit for bit: a sequence alone (its own width) and batched with a farther one (a wider mask). (An INT8
    cache's weights are rounded by each chunk's largest: a chunk's positions do not depend on the width.)"""
    reach = [70, 500]
    q, k, v, mask = inputs(9, 3, reach, 512, False, dtype=dtype)
    together = compiled(lambda *a: attention(*a, 0.125), q, k, v, mask)
    width = (reach[0] // ATTENTION_BLOCK + 1) * ATTENTION_BLOCK
    alone = compiled(lambda *a: attention(*a, 0.125), q[:1], k[:1, :, :width], v[:1, :, :width], mask[:1, ..., :width])
    assert torch.equal(together[:1], alone)


@torch.no_grad()
def test_pointwise_consumers_fused_into_the_kernel_see_its_result():
    """Inductor fuses pointwise ops on the attention (an INT8 layer's smoothing, as a [rows, features] view)
    into the template: its epilogue."""
    q, k, v, mask = inputs(9, 3, [100], 128, False)
    smooth = torch.rand(9 * 64) + 0.5

    def step(q, k, v, mask):
        att = attention(q, k, v, mask, 0.125)
        return att.transpose(1, 2).reshape(1, -1) * smooth

    expected = decode_attention(q, k, v, mask, 0.125).transpose(1, 2).reshape(1, -1) * smooth
    counters.clear()
    torch.testing.assert_close(compiled(step, q, k, v, mask), expected, atol=2e-2, rtol=1e-2)
    assert counters["inductor"]["cpp_epilogue_fusion_counter"] == 1


def prompt_inputs(
    heads: int, kv_heads: int, start: int, count: int, bias: bool, dim: int = 64, cache_dtype=torch.bfloat16
):
    """A prompt's ``count`` FP32 queries at positions ``start...``, the cache up to them (a slice of a longer
    one, as in a step) and the step's mask, as ``StaticLlama`` and ``StaticMPT`` pass them."""
    torch.manual_seed(0)
    width = start + count
    q = torch.randn(1, heads, count, dim)
    cache = cache_of(cache_dtype, 1, kv_heads, width + 7, dim)
    mask = attention_mask(width + 7, start, count, compiled=True)[None, None]  # [1, 1, T, L]
    if bias:  # ALiBi: a slope a head, masked positions -inf, in the cache's type
        distance = torch.arange(width)[None, :] - torch.arange(start, width)[:, None]
        slopes = torch.rand(heads)[:, None, None]
        mask = (slopes * distance).masked_fill(~mask[0], float("-inf")).to(torch.bfloat16)[None]
    return q, cache[0, :, :, :width], cache[1, :, :, :width], mask


@torch.no_grad()
@pytest.mark.parametrize(
    "heads, kv_heads, start, count, bias, cache_dtype",
    [
        (9, 3, 0, 200, False, torch.bfloat16),
        (6, 2, 150, 37, False, torch.bfloat16),
        (4, 4, 70, 90, True, torch.bfloat16),
        (9, 3, 100, 70, False, torch.float32),  # FP32 products on every CPU
        (6, 2, 150, 37, False, torch.int8),
    ],
    ids=["prompt", "after-a-prefix", "alibi", "fp32-cache", "int8-cache"],
)
def test_the_prompt_kernel_computes_sdpas_attention(heads, kv_heads, start, count, bias, cache_dtype):
    """In FP32, as SDPA does in FP32; with BF16 products (AVX512_BF16), no further from it than ATen's BF16
    flash kernel, which rounds the same operands and its output too."""
    q, k, v, mask = prompt_inputs(heads, kv_heads, start, count, bias, cache_dtype=cache_dtype)
    expected = prompt_attention(q, k, v, mask, 0.125)  # eagerly: SDPA, in FP32
    # the operator itself: on CPUs with AMX, ``attention`` leaves prompts to SDPA
    result = compiled(lambda *a: prompt_attention(*a, 0.125), q, k, v, mask, mark=PROMPT_MARK)
    assert result.shape == expected.shape and result.dtype == torch.float32
    if not attention_kernel.bf16_products(k.dtype, v.dtype, q.shape[-1]):
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-4)
        return
    k, v = as_float(k).to(torch.bfloat16), as_float(v).to(torch.bfloat16)  # an INT8 cache's values rounded
    flash = F.scaled_dot_product_attention(
        q.to(torch.bfloat16), k, v, attn_mask=mask, scale=0.125, enable_gqa=heads != kv_heads
    ).float()

    def error(x):
        return ((x - expected).norm() / expected.norm()).item()

    assert error(result) <= 1.1 * error(flash), (error(result), error(flash))


@torch.no_grad()
def test_the_prompt_kernels_fused_consumers_see_its_result():
    """A pointwise consumer in the kernel's own layout (the model's, which first brings the heads together,
    inductor does not fuse)."""
    q, k, v, mask = prompt_inputs(9, 3, 40, 50, False)
    smooth = torch.rand(64) + 0.5

    def step(q, k, v, mask):
        return prompt_attention(q, k, v, mask, 0.125) * smooth

    expected = prompt_attention(q, k, v, mask, 0.125) * smooth
    counters.clear()
    torch.testing.assert_close(compiled(step, q, k, v, mask, mark=PROMPT_MARK), expected, atol=2e-2, rtol=1e-2)
    assert counters["inductor"]["cpp_epilogue_fusion_counter"] == 1


def test_the_kernels_are_right_with_avx2_vectors_too():
    """Inductor writes AVX2 code on AVX2 CPUs (8 floats a vector, not 16): the same tests, in a process that
    ``ATEN_CPU_CAPABILITY`` sends down to AVX2, on whatever CPU the tests run."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        pytest.skip("this process is the AVX2 one")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    isa = "from torch._inductor.cpu_vec_isa import pick_vec_isa; print(pick_vec_isa())"
    assert subprocess.run([sys.executable, "-c", isa], env=env, capture_output=True, text=True).stdout.strip() == "avx2"
    tests = [
        f"{__file__}::test_the_kernel_computes_sdpas_attention",
        f"{__file__}::test_decode_attention_on_a_bf16_cache_is_fp32_attention_to_the_rounding_of_its_weights",
        f"{__file__}::test_pointwise_consumers_fused_into_the_kernel_see_its_result",
        f"{__file__}::test_the_prompt_kernel_computes_sdpas_attention",
        f"{__file__}::test_the_prompt_kernels_fused_consumers_see_its_result",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@torch.no_grad()
def test_keys_and_values_from_one_tensor():
    """Keys and values sliced from one tensor inside the step (a fused cache): the kernel takes each by its own
    name, where inductor would have passed their one buffer once."""
    q, k, v, mask = inputs(6, 2, [70, 20], 96, False)
    kv = torch.stack([k, v])
    expected = decode_attention(q, k, v, mask, 0.125)
    result = compiled(lambda q, kv, mask: decode_attention(q, kv[0], kv[1], mask, 0.125), q, kv, mask)
    torch.testing.assert_close(result, expected, atol=2e-2, rtol=1e-2)


@torch.no_grad()
def test_the_last_query_of_a_prompt():
    """A prompt's last layer attends for its last position alone (``compact.last_query``): the query and the mask
    row are slices that start inside their tensors, which the kernel reads from where they start."""
    torch.manual_seed(0)
    count, width = 40, 40
    q = torch.randn(1, 6, count, 64).to(torch.bfloat16)
    k, v = cache_of(torch.bfloat16, 1, 2, width + 7, 64)[:, :, :, :width]
    mask = attention_mask(width + 7, 0, count, compiled=True)[None, None]  # [1, 1, T, L], causal

    def last(q, k, v, mask):
        return decode_attention(q[:, :, -1:], k, v, mask[..., -1:, :], 0.125)

    expected = F.scaled_dot_product_attention(q[:, :, -1:].float(), k.float(), v.float(), scale=0.125, enable_gqa=True)
    torch.testing.assert_close(compiled(last, q, k, v, mask), expected, atol=2e-2, rtol=1e-2)
