"""The kernel audit: what the INT8 GEMMs of a step (or of eager layers) really run on this CPU.

Two ways a GEMM falls back to a reference implementation without failing: oneDNN picks its ``ref_*``
implementation for a primitive it has no kernel for on this ISA (seen only when it runs: ``ONEDNN_VERBOSE``),
and inductor generates ``CppMicroGemmRef``, its plain C++ loop, when no micro-kernel fits the CPU and dtypes
(seen in the generated code: ``step_kernels``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch

from server.runtime.aoti import kernels as step_kernels


def onednn_implementations(run: Callable[[], object]) -> list[tuple[str, str]]:
    """(primitive, implementation) of every oneDNN primitive that ``run()`` executes, from oneDNN's verbose
    lines, which oneDNN writes to file descriptor 1 itself."""
    with tempfile.TemporaryFile(mode="w+") as captured:
        saved = os.dup(1)
        try:
            os.dup2(captured.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        return onednn_executions(captured.read())


def onednn_executions(text: str) -> list[tuple[str, str]]:
    """(primitive, implementation) of each execution line of oneDNN's verbose output in ``text``."""
    fields = [
        line.split(",")
        for line in text.splitlines()
        if line.startswith("onednn_verbose") and ",primitive,exec," in line
    ]
    return [(f[5], f[6]) for f in fields if len(f) > 6]


def reference_kernels(gemms: dict[str, int], onednn: list[tuple[str, str]]) -> list[str]:
    """The reference implementations among a step's GEMMs and the oneDNN primitives it ran."""
    found = [step_kernels.REFERENCE] if gemms.get(step_kernels.REFERENCE) else []
    return found + sorted({f"onednn {primitive}: {impl}" for primitive, impl in onednn if impl.startswith("ref")})
