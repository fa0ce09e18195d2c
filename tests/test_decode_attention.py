"""q8chat's decode attention kernel, compiled by inductor, against SDPA: grouped queries, a batched step's
slots each with its own reach, MPT's additive ALiBi bias, fused pointwise consumers, and a sequence's result
the same whatever its batch attends."""

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from server.runtime.aoti import attention as attention_kernel
from server.runtime.attention_op import decode_attention
from server.runtime.compact import ATTENTION_BLOCK, attention

MARK = "q8chat::decode_attention"  # a comment in the kernel's source


def inputs(heads: int, kv_heads: int, reach: list[int], width: int, bias: bool, dim: int = 64):
    torch.manual_seed(0)
    slots = len(reach)
    q = torch.randn(slots, heads, 1, dim).to(torch.bfloat16)
    cache = torch.randn(2, slots, kv_heads, width + 7, dim).to(torch.bfloat16)  # longer: the step's slices
    k, v = cache[0, :, :, :width], cache[1, :, :, :width]
    mask = (torch.arange(width)[None, :] <= torch.tensor(reach)[:, None])[:, None, None]  # [B, 1, 1, L]
    if bias:
        slopes = torch.rand(heads)[None, :, None, None]
        mask = (slopes * (torch.arange(width) - reach[0])).masked_fill(~mask, float("-inf")).to(torch.bfloat16)
    return q, k, v, mask


def compiled(fn, *args):
    attention_kernel.register()
    torch._dynamo.reset()
    result, sources = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    assert any(MARK in source for source in sources), "the op was not lowered to q8chat's kernel"
    return result


@torch.no_grad()
@pytest.mark.parametrize(
    "heads, kv_heads, reach, bias",
    [(9, 3, [600], False), (6, 2, [3 * ATTENTION_BLOCK - 8, 3, ATTENTION_BLOCK + 5], False), (4, 4, [90, 40], True)],
    ids=["gqa", "batch", "alibi"],
)
def test_the_kernel_computes_sdpas_attention(heads, kv_heads, reach, bias):
    width = max(r // ATTENTION_BLOCK + 1 for r in reach) * ATTENTION_BLOCK
    q, k, v, mask = inputs(heads, kv_heads, reach, width, bias)
    expected = decode_attention(q, k, v, mask, 0.125)  # eagerly: SDPA
    result = compiled(lambda *a: attention(*a, 0.125), q, k, v, mask)
    assert result.shape == expected.shape and result.dtype == torch.float32
    # SDPA rounds its BF16 output; the kernel keeps FP32
    torch.testing.assert_close(result, expected, atol=1e-2, rtol=1e-2)


@torch.no_grad()
def test_a_sequences_attention_does_not_depend_on_its_batch():
    """Bit for bit: a sequence alone (its own width) and batched with a farther one (a wider mask)."""
    reach = [70, 500]
    q, k, v, mask = inputs(9, 3, reach, 512, False)
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


def test_the_kernel_is_right_with_avx2_vectors_too():
    """Inductor writes AVX2 code on AVX2 CPUs (8 floats a vector, not 16): the same tests, in a process that
    ``ATEN_CPU_CAPABILITY`` sends down to AVX2, on whatever CPU the tests run."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        pytest.skip("this process is the AVX2 one")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    isa = "from torch._inductor.cpu_vec_isa import pick_vec_isa; print(pick_vec_isa())"
    assert subprocess.run([sys.executable, "-c", isa], env=env, capture_output=True, text=True).stdout.strip() == "avx2"
    tests = [
        f"{__file__}::test_the_kernel_computes_sdpas_attention",
        f"{__file__}::test_pointwise_consumers_fused_into_the_kernel_see_its_result",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
