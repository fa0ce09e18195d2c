"""Whether a compiled step's weight-only layers (``torch._weight_int8pack_mm``) may run inductor's GEMM template.

The template multiplies from its own copy of the weights, packed for its micro-kernel, and the decode and
prompt steps pack them differently (one row with AVX-512 FMAs, many with AMX tiles), so a model served with
both steps holds its weight-only layers twice (the stored rows, which no kernel reads, are given back). A
model whose weight-only layers are large (``Int8Linear.stored_rows``: more than
``quant.kernels.PACKED_COPY_BYTES``) is compiled with ATen's kernel for them, which reads the stored rows that
the other step reads too, so one copy serves both (one row of a 4096x11008 weight: 1.55 ms by ATen's kernel,
1.5 by the template, AMX Xeon).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_from_stored_rows = False


def register() -> None:
    """Wrap inductor's lowering of ``_weight_int8pack_mm``, once per process: within ``from_stored_rows`` it
    lowers to ATen's kernel alone."""
    import torch
    import torch._inductor.config as inductor
    import torch._inductor.kernel.mm  # noqa: F401  (registers the quantized lowerings in their order)
    from torch._inductor.lowering import lowerings

    op = torch.ops.aten._weight_int8pack_mm.default
    original = lowerings[op]
    if getattr(original, "q8chat_stored_rows", False):
        return

    def lowering(*args, **kwargs):
        if not _from_stored_rows:
            return original(*args, **kwargs)
        with inductor.patch(max_autotune_gemm_backends="ATEN"):
            return original(*args, **kwargs)

    lowering.q8chat_stored_rows = True
    lowerings[op] = lowering


@contextlib.contextmanager
def from_stored_rows(stored: bool) -> Iterator[None]:
    """Within it, weight-only GEMMs lower to ATen's kernel on the stored rows if ``stored``."""
    global _from_stored_rows
    before, _from_stored_rows = _from_stored_rows, stored
    try:
        yield
    finally:
        _from_stored_rows = before
