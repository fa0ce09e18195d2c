"""The compiled steps' constants in memory: one copy of those the steps have in common, none of those no
kernel reads.

AOTInductor copies all of a step's constants into one allocation of its own, so whatever is resident
there stays resident:
- The prefill and decode steps are compiled apart, and each carries its own copy of every frozen constant:
  for the default model 112 of the prefill step's 188 MB are byte for byte the decode step's (most GEMMs
  pick the same packed layout for both). Each duplicate is pointed at the first copy, user-managed.
- When inductor's GEMM template packs a weight of its own, it keeps the raw weight too (it prunes only a
  weight whose graph node has a single user): the weight-only INT8 layers' raw weights are never read.
  23 MB for the default model, 342 MB for the 1B shape.
The pages under a copy nothing reads are given back to the kernel (``madvise(MADV_DONTNEED)``).

Weights that oneDNN prepacked (its INT8 ``qlinear`` on AMX and VNNI CPUs) are opaque tensors, with no
storage that Python can read or address: they are neither compared nor given back.
"""

from __future__ import annotations

import hashlib
import mmap
import re

import torch

from server.runtime import heap


def inner_pages(address: int, size: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """The whole pages inside ``[address, address + size)``: (start, length), length 0 if none. A page
    that is partly outside holds someone else's bytes (a neighbouring constant, the allocator's header)."""
    start = -(-address // page) * page
    end = (address + size) // page * page
    return start, max(0, end - start)


def unused_constants(wrapper_source: str) -> list[str]:
    """Constants that AOTInductor's generated wrapper binds (``auto& NAME = constants_->at(i);``) but never
    passes on. Parsing generated code: the build checks the result by running the step without them."""
    bound = re.findall(r"auto& (\w+) = constants_->at\(\d+\);", wrapper_source)
    rest = "\n".join(
        line for line in wrapper_source.splitlines() if "constants_->at(" not in line and "constants_info_[" not in line
    )
    used = set(re.findall(r"\w+", rest))
    return [name for name in bound if name not in used]


def addressable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s bytes can be read and its pages given back: not an opaque (oneDNN) tensor."""
    return tensor.layout == torch.strided


def release_constants(constants: dict[str, torch.Tensor], names) -> int:
    """Give back the pages of ``constants`` (a container's, by name) named in ``names``, which nothing reads."""
    return sum(_release(constants[name]) for name in names if name in constants and addressable(constants[name]))


def _release(tensor: torch.Tensor) -> int:
    """Give back the whole pages under ``tensor``'s bytes; its contents become undefined."""
    start, length = inner_pages(tensor.data_ptr(), tensor.nbytes)
    return length if length and heap.give_back(start, length) else 0


SAMPLES, SAMPLE_BYTES = 16, 4096


def _identity(tensor: torch.Tensor) -> tuple:
    """What tells most constants apart at a glance: their type, shape, and ``SAMPLES`` runs of bytes spread over
    them (hashing all of a 7B model's took 15 s of a restart). Equal identities are compared whole."""
    flat = tensor.reshape(-1).view(torch.uint8)
    last = max(0, flat.numel() - SAMPLE_BYTES)
    starts = sorted({last * i // (SAMPLES - 1) for i in range(SAMPLES)})
    sample = b"".join(flat[start : start + SAMPLE_BYTES].numpy().tobytes() for start in starts)
    return tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), hashlib.blake2b(sample, digest_size=16).digest()


class SharedConstants:
    """One copy of the constants that compiled spans (``CompiledSpan``) have in common: each span added, as it
    is loaded, has its constants that repeat one of an earlier span (or an earlier one of its own) pointed at
    that copy, and their pages given back, before the next span is loaded. Unused constants are left alone:
    their pages are given back already. ``shared``, ``released``: the bytes so far."""

    def __init__(self) -> None:
        self._copies: dict[tuple, list[tuple[torch.Tensor, object]]] = {}  # by identity: each copy, its span
        self.shared = self.released = 0

    def add(self, span) -> None:
        repoint, dropped, lenders = {}, [], []
        for name, tensor in span.constants.items():
            if (
                name in span.unused
                or not addressable(tensor)
                or not tensor.is_contiguous()
                or tensor.nbytes < mmap.PAGESIZE
            ):
                continue
            copies = self._copies.setdefault(_identity(tensor), [])
            kept, lender = next(((kept, lender) for kept, lender in copies if torch.equal(kept, tensor)), (None, None))
            if kept is None:
                copies.append((tensor, span))
                continue
            repoint[name] = kept
            dropped.append(tensor)
            if lender is not span and lender not in lenders:
                lenders.append(lender)
        span.container.use_in_place(repoint, lenders)  # the copies live as long as the spans reading them
        self.shared += sum(tensor.nbytes for tensor in dropped)
        self.released += sum(_release(tensor) for tensor in dropped)
