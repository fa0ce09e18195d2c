"""Which instructions compute a W8A8 product on this CPU, exactly and fast.

A W8A8 product is ``sum_k xq[m, k] * w[n, k]`` over INT8 values: an integer, rescaled in float afterwards.
x86 CPUs differ in which INT8 instruction they have, and each kernel family is exact and fast only on some:

- ``s8s8``: ``torch._int_mm``. AMX multiplies s8 by s8 natively, and oneDNN's s8s8 kernels (inductor's AMX
  template when compiled) are fast there. Without AMX, oneDNN's prepacked s8s8 matmul runs its reference
  kernel (``ref_int8``, about 12 ms for a 576x1536 GEMV on AVX-512 VNNI), and without VNNI ``_int_mm`` is a
  scalar loop (338 us for a 576x960 GEMV on an AVX2 EPYC, against 47 us for ``bf16``). Compiled without AMX,
  it runs q8chat's own micro-kernels for inductor's GEMM template (``server/runtime/aoti/int8_gemm.py``): on
  AVX2, s8 times s8 through ``vpmaddubsw`` with the signs moved onto one operand (exact for +-127 operands); on
  AVX-512 VNNI, ``vpdpbusd`` on the weights shifted to u8, less 128 times each activation row's sum. The
  compiled decode and batch steps of AVX-512 VNNI CPUs multiply so.
- ``u8s8``: AVX-512 VNNI and AVX-VNNI multiply u8 by s8 (``vpdpbusd``). Activations are shifted by 128 to
  u8 and the product is written as the dequantize-linear pattern that inductor rewrites into oneDNN's u8s8
  ``qlinear`` (or its own VNNI template): what x86's PT2E quantization compiles to on these CPUs. Compiled
  prefill steps only: the weights must be prepacked by inductor's freezing, and at one row (decode) each
  call's fixed cost and oneDNN's GEMV bandwidth made ``bf16`` faster.
- ``bf16``: the INT8 values travel in BF16, which holds every one of them exactly, through the weight-only
  INT8 kernel (``_weight_int8pack_mm``), which multiplies and accumulates in FP32: products are exact, and
  sums too while they stay below 2**24 in magnitude; the result is rounded to BF16. The eager kernel of
  CPUs without VNNI, the compiled decode step's of AVX-VNNI CPUs without AVX-512, and both compiled steps' of
  AVX-512 CPUs without VNNI. (oneDNN's own
  u8s8 GEMM on AVX2 saturates ``vpmaddubsw``'s 16-bit pair sums: it lost up to 20 % of a 512-row product.)

``reference`` is the exact result on any CPU (FP32 BLAS on the INT8 values); quantization measures its
errors with it, so a checkpoint does not depend on the CPU it was made on.

``ONEDNN_MAX_CPU_ISA`` caps the choice as it caps oneDNN (``AVX2`` gives an AVX2 CPU's kernels on any CPU).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.nn import functional as F

KERNELS = ("s8s8", "u8s8", "bf16")
REFERENCE = "reference"
EAGER_OPS = {"s8s8": "aten::_int_mm", "bf16": "aten::_weight_int8pack_mm"}  # the ATen op an eager kernel runs
U8_ZERO_POINT = 128
_CAPS = {
    "AMX": ("amx_int8",),
    "AMX_BF16": ("amx_bf16",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "BF16": ("avx512_bf16", "amx_bf16"),
}
# oneDNN's ISA names, weakest first, and what each of them allows of ours
_ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
)


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where they cannot be read); this machine's are
    read once."""
    return _read_flags(cpuinfo) if cpuinfo is not None else _this_machine_flags()


@functools.cache
def _this_machine_flags() -> frozenset[str]:
    return _read_flags(Path("/proc/cpuinfo"))


def _read_flags(cpuinfo: Path) -> frozenset[str]:
    try:
        line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


# the flags that decide which kernels can run, as the bench and the README name a CPU class
CLASS_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_class(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name and the flags of ``CLASS_FLAGS`` it has: what a speed figure is measured on."""
    try:
        name = next(
            (
                line.partition(":")[2].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        )
    except OSError:
        name = "unknown"
    return {"model_name": name, "flags": [flag for flag in CLASS_FLAGS if flag in cpu_flags(cpuinfo)]}


def _onednn_allows(feature: str, cap: str | None) -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA=cap`` leaves oneDNN ``feature`` ("AMX", "VNNI" or "BF16")."""
    if not cap or cap.upper() not in _ONEDNN_ISAS:
        return True
    cap = cap.upper()
    if feature.startswith("AMX"):
        return "AMX" in cap
    if feature == "BF16":
        return _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index("AVX512_CORE_BF16")
    return "VNNI" in cap or _ONEDNN_ISAS.index(cap) >= _ONEDNN_ISAS.index("AVX512_CORE_VNNI")


def _has(feature: str, flags: frozenset[str] | None, onednn_cap: str | None) -> bool:
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if onednn_cap is None else onednn_cap
    return bool(flags & set(_CAPS[feature])) and _onednn_allows(feature, cap)


def amx_int8(flags: frozenset[str] | None = None, onednn_cap: str | None = None) -> bool:
    """Whether oneDNN multiplies INT8 with AMX here: the only x86 unit that multiplies s8 by s8."""
    return _has("AMX", flags, onednn_cap)


def native_bf16_gemm(flags: frozenset[str] | None = None, onednn_cap: str | None = None) -> bool:
    """Whether oneDNN multiplies BF16 natively here (AVX512_BF16 or AMX, not capped below them): there a BF16
    GEMM on INT8 weights outruns ``_weight_int8pack_mm`` at a prompt's rows (1.0 against 2.8 ms for a 576x1536
    weight at 512 rows, Zen 5); elsewhere it converts, and was 3 times slower (oneDNN capped at AVX2)."""
    return _has("BF16", flags, onednn_cap)


# The most bytes of weights that compiled steps may keep in two packed copies, one per step, where one copy
# read by both would be slower. Weight-only layers: inductor's INT8-weight template reads a copy packed for its
# micro-kernel (the decode step's and the prompt step's differ); beyond the limit the steps read the stored
# rows (``server.runtime.aoti.weight_only``; all 32 ``down_proj`` layers of a random Llama-7B: 1.4 GB a copy).
# W8A8 layers on AVX-512 VNNI CPUs without AMX: oneDNN's u8s8 prompt GEMMs read weights it prepacked in its own
# layout; beyond the limit the prompt step multiplies with the decode step's micro-kernel and packing, and the
# two steps share them (``default_kernels``). A small model's copies are worth their speed; a 7B model's not.
PACKED_COPY_BYTES = 256 * 2**20


def packed_copies(weight_bytes: int) -> bool:
    """Whether compiled steps may multiply weights of ``weight_bytes`` from a packed copy each."""
    return weight_bytes <= PACKED_COPY_BYTES


def bf16_prompt_gemm(
    weight_only_bytes: int = 0, flags: frozenset[str] | None = None, onednn_cap: str | None = None
) -> bool:
    """Whether a compiled prompt step multiplies a model's weight-only INT8 layers (``weight_only_bytes`` of
    weights) by their values converted to BF16 at each call (``quant.int8``), keeping no copy: where oneDNN
    multiplies BF16 natively (``native_bf16_gemm``) and inductor's GEMM template for INT8 weights has no AMX
    micro-kernel, or has one but its packed copies would exceed ``PACKED_COPY_BYTES``. With AMX the template
    converts the weights tile by tile as it multiplies: 38 ms for 512 rows by a 4096x11008 weight, against 37
    for oneDNN's BF16 GEMM on the weight converted beforehand and 71 for the compiled conversion and GEMM; 2.6,
    4.0 and 39 ms at 8 rows (AMX Xeon, 2 threads)."""
    flags = cpu_flags() if flags is None else flags
    if not native_bf16_gemm(flags, onednn_cap):
        return False
    return not flags & set(_CAPS["AMX_BF16"]) or not packed_copies(weight_only_bytes)


def packed_bf16_attention(flags: frozenset[str] | None = None, onednn_cap: str | None = None) -> bool:
    """Whether ATen's flash attention multiplies BF16 with oneDNN's AMX kernels here. Elsewhere its products
    go through a generic BF16 GEMM (MKL's, FP32 inside, on AMD), and q8chat's prompt attention kernel
    outruns it (``server.runtime.aoti.attention``)."""
    return _has("AMX_BF16", flags, onednn_cap)


STEPS = ("decode", "prefill")  # the compiled steps, each with its own kernel (a batch step: the decode step's)


def default_kernels(
    flags: frozenset[str] | None = None, onednn_cap: str | None = None, weight_bytes: int = 0
) -> dict[str, str]:
    """The kernel of KERNELS that each compiled step computes W8A8 products with on this CPU, for a checkpoint of
    ``weight_bytes`` stored weights: exact, and the fastest measured (see the module). A prompt's many rows make
    the prefill compute-bound: it gets the INT8 instruction. The decode step multiplies one row, bound by
    reading the weights and by each GEMM's fixed cost: on VNNI CPUs without AMX, oneDNN's u8s8 ``qlinear`` is
    an extern call per GEMM, slower than inductor's own template, which multiplies s8 by s8 with q8chat's VNNI
    micro-kernel where AVX-512 has one, and the INT8 values in BF16 elsewhere (the same exact products). There
    the prefill takes oneDNN's u8s8 GEMMs, a few per cent faster than the micro-kernel on a Zen 4 EPYC, unless
    the second copy of the weights they read costs too much (``PACKED_COPY_BYTES``): then the decode step's
    kernel, whose packed weights the two steps share. The batch step takes the decode step's kernel, so that a
    sequence computes the same alone or batched (``bf16`` rounds each product's sum to BF16, ``s8s8`` does
    not)."""
    flags = cpu_flags() if flags is None else flags
    if amx_int8(flags, onednn_cap):
        return dict.fromkeys(STEPS, "s8s8")
    if _has("VNNI", flags, onednn_cap):
        if "avx512_vnni" not in flags:  # q8chat's s8s8 micro-kernel (int8_gemm) needs AVX-512's VNNI
            return {"prefill": "u8s8", "decode": "bf16"}
        return {"prefill": "u8s8" if packed_copies(weight_bytes) else "s8s8", "decode": "s8s8"}
    return dict.fromkeys(STEPS, "s8s8" if "avx2" in flags and "avx512f" not in flags else "bf16")  # AVX2: ours


def eager_kernel(flags: frozenset[str] | None = None, onednn_cap: str | None = None) -> str:
    """The kernel of uncompiled layers on this CPU: ``s8s8`` where oneDNN's ``_int_mm`` is fast without
    prepacked weights (AMX, VNNI), else ``bf16``."""
    return "s8s8" if amx_int8(flags, onednn_cap) or _has("VNNI", flags, onednn_cap) else "bf16"


def eager_kernels(flags: frozenset[str] | None = None, onednn_cap: str | None = None) -> dict[str, str]:
    """The kernel of each step of the compact model run eagerly: ``eager_kernel()`` for prompts, ``bf16`` for
    decoding on every CPU. One row is bound by reading the weights, and ``_weight_int8pack_mm`` reads them
    faster than ``_int_mm``'s oneDNN GEMV: a 7B MPT's eager decode step took 656 ms against 913 on an AMX
    Xeon. The same products as the compiled decode step's on VNNI CPUs (see ``bf16``)."""
    return {"prefill": eager_kernel(flags, onednn_cap), "decode": "bf16"}


def kernels_by_step(kernel: str | None = None, weight_bytes: int = 0) -> dict[str, str]:
    """The kernel of each compiled step: this CPU's for a checkpoint of ``weight_bytes`` stored weights
    (``default_kernels``) for None or ``auto``, else ``kernel`` for both (``--int8-kernel``, a bench variant's
    ``@kernel``)."""
    if kernel in (None, "auto"):
        return default_kernels(weight_bytes=weight_bytes)
    return dict.fromkeys(STEPS, check_kernel(kernel))


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS + (REFERENCE,):
        raise ValueError(f"unknown INT8 kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    return kernel


def w8a8_matmul(xq: torch.Tensor, weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """``xq [M, K] int8 @ weight [N, K] int8 ^T`` as float32 integers, by ``kernel``. The graph of each is
    what inductor's INT8 patterns expect, so it compiles to that kernel's GEMM."""
    if kernel == "s8s8":
        return torch._int_mm(xq, weight.t()).to(torch.float32)
    if kernel == "bf16":
        ones = torch.ones(weight.shape[0], dtype=torch.bfloat16)
        return torch._weight_int8pack_mm(xq.to(torch.bfloat16), weight, ones).to(torch.float32)
    if kernel == "u8s8":
        return _u8s8_linear(xq, weight)
    if kernel == REFERENCE:
        return F.linear(xq.to(torch.float32), weight.to(torch.float32))
    raise ValueError(f"unknown INT8 kernel {kernel!r}")


def _u8s8_linear(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The u8 activations (``xq + 128``, zero point 128) times the s8 weights, written as PT2E's quantized
    linear: inductor's freezing prepacks the weight and lowers this to oneDNN's u8s8 ``qlinear``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

    decomposed = torch.ops.quantized_decomposed
    # through int32: inductor vectorizes that conversion, not int16's (a scalar loop, 3 times slower)
    xu8 = (xq.to(torch.int32) + U8_ZERO_POINT).to(torch.uint8)
    x = decomposed.dequantize_per_tensor.default(xu8, 1.0, U8_ZERO_POINT, 0, 255, torch.uint8)
    ones = torch.ones(weight.shape[0], dtype=torch.float32)
    zeros = torch.zeros(weight.shape[0], dtype=torch.int64)
    w = decomposed.dequantize_per_channel.default(weight, ones, zeros, 0, -128, 127, torch.int8)
    return F.linear(x, w)
