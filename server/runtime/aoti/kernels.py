"""What the matrix multiplies of a compiled step run, read from the C++ that AOTInductor generated for it.

Each GEMM of a step is either one of inductor's own C++ templates, whose micro-kernel is told apart by the
instructions it uses (AMX tiles, AVX-512 VNNI, BF16 pairs, vector FMA, or ``CppMicroGemmRef``: the plain loop inductor
falls back to when no micro-kernel fits the CPU and dtypes), or a call into ATen or oneDNN through the C
shim (``aoti_torch_cpu_<op>``). The build writes the counts next to the step, the server logs them, and the
kernel audit fails on a reference kernel. oneDNN's own choice inside an extern call is seen only when it
runs (``ONEDNN_VERBOSE``).
"""

from __future__ import annotations

import collections
import re

REFERENCE = "template:reference"
_MICRO_KERNELS = (  # the first whose mark a template's code holds names it
    ("template:amx", re.compile(r"_tile_dp\w+")),
    ("template:avx512-vnni", re.compile(r"_mm512_dpbusds?_epi32")),
    ("template:avx-vnni", re.compile(r"_mm256_dpbusds?_(avx_)?epi32")),
    ("template:avx2-int8", re.compile(r"_mm256_maddubs_epi16")),  # q8chat's (int8_gemm)
    ("template:avx512-bf16-pairs", re.compile(r"_mm512_dpbf16_ps")),  # q8chat's (bf16_pairs_gemm)
    ("template:vector-fma", re.compile(r"at::vec::fmadd")),
    (REFERENCE, re.compile(r"result \+= \(\w+\)A\[m \* lda \+ k\]")),
)
_EXTERN_CALL = re.compile(r"CHECK\(aoti_torch_cpu_(\w+?)(?:_out)?\(")
_GEMM_OPS = re.compile(r"mm|linear|attention")  # what of ATen's ops multiplies matrices
_KERNEL = re.compile(r'extern "C"\s+void\s+(\w+)\(')


def gemm_kernels(kernel_source: str, wrapper_source: str) -> dict[str, int]:
    """Calls per step, by kind: ``template:<micro-kernel>`` for inductor's GEMM templates, ``extern:<op>``
    for GEMMs (and attention) handed to ATen/oneDNN."""
    counts: collections.Counter = collections.Counter()
    previous = 0
    for match in _KERNEL.finditer(kernel_source):  # a template's micro-kernel is defined above its entry
        name, end = match.group(1), kernel_source.find("\n}", match.start())
        body, previous = kernel_source[previous:end], end
        if "micro_gemm" not in body:
            continue
        kind = next((kind for kind, mark in _MICRO_KERNELS if mark.search(body)), "template:other")
        counts[kind] += len(re.findall(rf"\b{name}\(\(", wrapper_source))
    for match in _EXTERN_CALL.finditer(wrapper_source):
        if _GEMM_OPS.search(match.group(1)):
            counts[f"extern:{match.group(1)}"] += 1
    return dict(sorted(counts.items()))


def describe(kernels: dict[str, int]) -> str:
    return ", ".join(f"{count} x {kind}" for kind, count in kernels.items()) or "no GEMMs"
