"""The W8A8 kernel each CPU class gets: chosen by its flags, exact, and free of reference kernels, eager and
compiled, on the CPU the tests run on."""

import pytest
import torch
from torch import nn

from quant.int8 import Int8Linear
from quant.kernels import (
    PACKED_COPY_BYTES,
    REFERENCE,
    STEPS,
    bf16_prompt_gemm,
    cpu_flags,
    default_kernels,
    eager_kernel,
    eager_kernels,
    native_bf16_gemm,
    w8a8_matmul,
)
from quant.smoothquant import Recipe
from server.runtime.aoti import int8_gemm
from server.runtime.aoti import steps as compiled_step
from server.runtime.aoti.container import Container
from server.runtime.compact import DEFAULT_KV_DTYPE, attention_mask, new_kv_caches
from server.runtime.static_llama import StaticLlama
from tests.harness import quantized_tiny, tiny_llama
from tests.kernel_audit import onednn_implementations, reference_kernels

AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
ALDER_LAKE = frozenset({"avx2", "avx_vnni"})
ZEN3 = frozenset({"avx2", "fma"})
LARGE = PACKED_COPY_BYTES + 1  # a checkpoint's stored weights


def test_each_cpu_class_gets_the_kernel_that_multiplies_int8_exactly():
    assert default_kernels(AMX, "") == dict.fromkeys(STEPS, "s8s8") and eager_kernel(AMX, "") == "s8s8"
    # VNNI: the prompt's rows get u8s8 (vpdpbusd, oneDNN); decoding, s8s8 through q8chat's AVX-512 VNNI
    # micro-kernel, or without AVX-512 the INT8 values in BF16 through inductor's template. Eager layers
    # multiply s8 by s8 (u8s8 needs prepacking).
    vnni = {"decode": "s8s8", "prefill": "u8s8"}
    assert default_kernels(ZEN4, "") == default_kernels(ZEN4, "", PACKED_COPY_BYTES) == vnni
    # a large model's prompt takes the decode step's kernel: one packed copy of its weights for both steps
    assert default_kernels(ZEN4, "", LARGE) == dict.fromkeys(STEPS, "s8s8")
    assert default_kernels(ALDER_LAKE, "", LARGE) == {"decode": "bf16", "prefill": "u8s8"}
    assert default_kernels(ALDER_LAKE, "") == {"decode": "bf16", "prefill": "u8s8"}
    assert eager_kernel(ZEN4, "") == eager_kernel(ALDER_LAKE, "") == "s8s8"
    # AVX2 alone: compiled s8s8 through q8chat's micro-kernel; eagerly, _int_mm is a scalar loop there
    assert default_kernels(ZEN3, "") == dict.fromkeys(STEPS, "s8s8") and eager_kernel(ZEN3, "") == "bf16"
    # ONEDNN_MAX_CPU_ISA caps the choice as it caps oneDNN; an AVX-512 CPU without VNNI gets bf16
    assert default_kernels(AMX, "AVX512_CORE_VNNI") == vnni
    assert default_kernels(AMX, "avx2") == dict.fromkeys(STEPS, "bf16")
    assert default_kernels(ZEN4, "AVX512_CORE_AMX") == vnni
    # eager steps: a prompt gets the eager kernel, one row (decode) the faster weight read of bf16
    assert eager_kernels(AMX, "") == eager_kernels(ZEN4, "") == {"prefill": "s8s8", "decode": "bf16"}
    assert eager_kernels(ZEN3, "") == dict.fromkeys(STEPS, "bf16")


def test_a_prompts_weight_only_layers_take_a_bf16_gemm_where_bf16_is_native_and_no_template_is_worth_its_copy():
    """Without AVX512_BF16 or AMX (or with oneDNN capped below them) a BF16 GEMM converts, and is slower than
    ``_weight_int8pack_mm``; with AMX, inductor's INT8-weight template is as fast without converting the
    weights, from a packed copy of its own: taken while that copy is small."""
    assert native_bf16_gemm(ZEN4, "") and native_bf16_gemm(AMX | {"amx_bf16"}, "")
    assert not native_bf16_gemm(AMX, "") and not native_bf16_gemm(ALDER_LAKE, "") and not native_bf16_gemm(ZEN3, "")
    assert native_bf16_gemm(ZEN4, "AVX512_CORE_AMX") and not native_bf16_gemm(ZEN4, "avx512_core_vnni")
    for size in (0, PACKED_COPY_BYTES + 1):
        assert bf16_prompt_gemm(size, ZEN4, "") and not bf16_prompt_gemm(size, ZEN4, "avx512_core_vnni")
        assert not bf16_prompt_gemm(size, ZEN3, "")
    assert not bf16_prompt_gemm(PACKED_COPY_BYTES, AMX | {"amx_bf16"}, "")
    assert bf16_prompt_gemm(PACKED_COPY_BYTES + 1, AMX | {"amx_bf16"}, "")


def exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.long() @ w.long().t()).double()


def operands(rows: int, k: int = 576, n: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range INT8 operands, with rows of ±127 whose products are large: what saturates a 16-bit sum."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    x[0] = 127
    w[: n // 2] = 127
    w[n // 2 :, : k // 2] = -127
    return x, w


def assert_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, kernel: str) -> None:
    """s8s8, u8s8 and the reference are exact; bf16 sums exactly and may round the sum to BF16 (2**-9)."""
    want = exact(x, w)
    error = (got.double() - want).abs()
    bound = 0 if kernel != "bf16" else want.abs() * 2**-8
    assert torch.all(error <= bound), f"{kernel}: error {error.max():.0f} where the sum is {want.abs().max():.0f}"


@pytest.mark.parametrize("rows", [1, 37])
def test_this_cpus_eager_kernel_and_the_reference_are_exact(rows):
    x, w = operands(rows)
    for kernel in (eager_kernel(), REFERENCE):
        assert_exact(w8a8_matmul(x, w, kernel), x, w, kernel)


def test_a_weight_only_layer_computes_each_row_alike_at_one_row_and_at_a_batchs_rows(tmp_path):
    """The decode and batch steps' weight-only GEMMs: each row's sums the same bit for bit whatever the count of
    rows (a sequence computes the same alone and batched), within rounding of the exact sums, and by
    q8chat's BF16-pairs micro-kernel where the CPU has AVX512_BF16 without AMX (``bf16_pairs_gemm``)."""
    _, w = operands(4, k=1536, n=576, seed=5)
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).float()
    x[1, :7] = 300.0  # a row with outliers, as the fallback layers' inputs have
    rows = {}
    for count in (1, 4):
        program = compiled_step.export_step(IntegerProduct(w, scheme="weight_only"), (x[None, :count],), None)
        _, gemms = compiled_step.compile_program(program, tmp_path / str(count), few_rows=True)
        container = Container(tmp_path / str(count) / "step.so", tmp_path / str(count) / "constants.blob")
        rows[count] = container.run([x[None, :count]])[0][0]
        ours = "avx512_bf16" in cpu_flags() and "amx_int8" not in cpu_flags()
        assert ("template:avx512-bf16-pairs" in gemms) == ours, gemms
    assert torch.equal(rows[1][0], rows[4][0])
    want = (x.double() @ w.double().t()) * 0.5
    # FP32 sums of 1,536 exact products, rounded to BF16 as _weight_int8pack_mm returns them
    bound = want.abs() * 2**-8 + (x.double().abs() @ w.double().abs().t()) * 0.5 * 2**-20
    assert torch.all((rows[4].double() - want).abs() <= bound)


class IntegerProduct(nn.Module):
    """An INT8 layer's integer product compiled alone: the layer's kernel on token rows [1, T, K] (per-token
    scale 1, so exact integers in), with its float rescale (weight scale 1/2: exact, and not a multiplication by
    one that inductor would drop, taking the INT8 pattern with it). ``weight_only``: BF16 activations instead."""

    def __init__(self, weight: torch.Tensor, kernel: str | None = None, scheme: str = "dynamic") -> None:
        super().__init__()
        linear = Int8Linear(weight.shape[1], weight.shape[0], bias=False, scheme=scheme, smooth=False)
        linear.weight, linear.weight_scale = weight, torch.full((weight.shape[0],), 0.5)
        self.linear = linear.with_kernel(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def compiled(kernel: str, w: torch.Tensor, rows: int, directory, few_rows: bool) -> tuple[Container, dict]:
    """The product compiled as the steps are: a fixed count of token rows (``few_rows``: decode, batch) or a
    symbolic count (prefill)."""
    example = (torch.zeros(1, rows if few_rows else 4, w.shape[1]),)
    dynamic = None if few_rows else ({1: torch.export.Dim("tokens", min=2, max=4096)},)
    program = compiled_step.export_step(IntegerProduct(w, kernel), example, dynamic)  # as the steps are exported
    onednn = compiled_step.onednn_gemms(kernel)
    _, gemms = compiled_step.compile_program(program, directory, few_rows=few_rows, onednn=onednn)
    return Container(directory / "step.so", directory / "constants.blob"), gemms


def audit(kernel: str, rows: int, tmp_path, few_rows: bool, depth: int = 576) -> list[str]:
    """What is wrong with ``kernel`` compiled on this CPU: reference kernels, or a product that is not exact."""
    x, w = operands(rows, depth, seed=rows)
    x[:, 0] = 127  # every row's max |x| is 127: its per-token scale is exactly 1
    container, gemms = compiled(kernel, w, rows, tmp_path / f"{kernel}-{rows}", few_rows)
    got = []
    implementations = onednn_implementations(lambda: got.append(2 * container.run([x[None].float()])[0][0]))
    problems = reference_kernels(gemms, implementations)
    try:
        assert_exact(got[0], x, w, kernel)
    except AssertionError as exc:
        problems.append(str(exc))
    return problems


@pytest.mark.parametrize(
    ("rows", "step", "depth"),
    [(1, "decode", 576), (3, "batch", 580), (64, "prefill", 576)],
    ids=["one-row", "batch-rows", "rows"],
)
def test_this_cpus_compiled_product_is_exact_and_runs_no_reference_kernel(rows, step, depth, tmp_path):
    """A batch step multiplies a fixed few rows with the decode step's kernel (3: a micro-kernel's row tail; a
    depth not a multiple of 64: a vector's tail where a micro-kernel sums a row); a prompt step, a small or a
    large model's kernel."""
    for kernel in {compiled_step.kernel_of(default_kernels(weight_bytes=size), step) for size in (0, LARGE)}:
        assert audit(kernel, rows, tmp_path, few_rows=step != "prefill", depth=depth) == []


@pytest.fixture(scope="module")
def tiny_w8a8(tokenizer):
    """A tiny Llama with every linear W8A8 (no fallback layers), dynamic activations."""
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model, Recipe(alpha=0.5, fallback_error=None))
    return model


def step_audit(model, kernel: str, step: str, directory) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A compiled step of ``model`` with ``kernel`` on this CPU: the reference kernels it and the eager compact
    model (this CPU's eager kernel) ran, and their logits on the same tokens."""
    net = StaticLlama(model, 64, kernel).eval()
    compiled_step.build(net, step, directory, DEFAULT_KV_DTYPE)
    loaded = compiled_step.load(directory)
    eager = StaticLlama(model, 64).eval()
    count = 1 if step == "decode" else 12
    start = 20 if step == "decode" else 0
    ids = torch.randint(0, 2000, (1, count), generator=torch.Generator().manual_seed(3))
    args = (ids, torch.arange(start, start + count), attention_mask(64, start, count, compiled=True))
    got, want = [], []
    with torch.no_grad():
        implementations = onednn_implementations(lambda: got.append(loaded(*args, new_kv_caches(model.config, 64))))
        implementations += onednn_implementations(lambda: want.append(eager(*args, new_kv_caches(model.config, 64))))
    return reference_kernels(loaded.gemms, implementations), got[0], want[0]


@pytest.mark.parametrize("step", ["decode", "prefill"])
def test_this_cpus_compiled_steps_run_no_reference_kernel_and_give_the_eager_logits(tiny_w8a8, step, tmp_path):
    references, got, want = step_audit(tiny_w8a8, default_kernels()[step], step, tmp_path / step)
    assert references == []
    # a decode step's GEMMs are inductor's templates alone (FEW_ROWS_GEMM_BACKENDS), as are a prompt step's where
    # oneDNN's alternative would be its reference s8s8 kernel (onednn_gemms)
    if step == "decode" or not compiled_step.onednn_gemms(default_kernels()[step]):
        gemms = compiled_step.load(tmp_path / step).gemms
        assert gemms and all(kind.startswith("template:") for kind in gemms), gemms
    assert (got - want).abs().max() < 0.05 * want.std() and torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif("amx_int8" in cpu_flags(), reason="AMX multiplies s8 by s8: no reference kernel to catch")
def test_the_audit_catches_the_reference_kernel_s8s8_ran_on_this_cpu_before_kernels_were_chosen(
    tiny_w8a8, tmp_path, monkeypatch
):
    """Without q8chat's own micro-kernels (``int8_gemm``), inductor's reference micro-kernel on AVX2 and AVX-512
    VNNI; oneDNN's reference int8 matmul (``ref_int8``) where its s8s8 lowering is an extern call."""
    from torch._inductor import config

    ours = int8_gemm.register()  # first: it imports inductor's template machinery in its order
    from torch._inductor.codegen import cpp_micro_gemm

    for kernel in ours.values():
        monkeypatch.delitem(cpp_micro_gemm.micro_gemm_configs, kernel)
    with config.patch(fx_graph_cache=False):  # no code generated with q8chat's kernel
        references, _, _ = step_audit(tiny_w8a8, "s8s8", "decode", tmp_path / "decode")
    assert references, "the s8s8 decode step ran no reference kernel"
