"""One copy of the constants that separately compiled steps have in common.

The prefill and decode steps are compiled apart, and each package carries its own copy of every frozen
constant: for the default model 135 of the prefill step's 160 MB are byte for byte the decode step's
(most GEMMs pick the same packed layout for both). AOTInductor copies each package's constants into one
allocation of its own, so the duplicates would stay resident. Here each duplicate is pointed at the
first copy, user-managed, and the pages under its own copy are given back to the kernel
(``madvise(MADV_DONTNEED)``): they are never read again.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import mmap

import torch

_MADV_DONTNEED = 4  # Linux


def inner_pages(address: int, size: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """The whole pages inside ``[address, address + size)``: (start, length), length 0 if none. A page
    that is partly outside holds someone else's bytes (a neighbouring constant, the allocator's header)."""
    start = -(-address // page) * page
    end = (address + size) // page * page
    return start, max(0, end - start)


def _release(tensor: torch.Tensor) -> int:
    """Give back the whole pages under ``tensor``'s bytes; its contents become undefined."""
    start, length = inner_pages(tensor.data_ptr(), tensor.nbytes)
    if length:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
            return 0
    return length


def _identity(tensor: torch.Tensor) -> tuple:
    digest = hashlib.blake2b(tensor.reshape(-1).view(torch.uint8).numpy(), digest_size=16).digest()
    return tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), digest


def share_constants(runners) -> tuple[int, int]:
    """Point every constant of ``runners`` (AOTInductor model containers) that repeats an earlier one at
    that earlier copy; returns (bytes shared, bytes given back). Only constants with a name of their own
    are considered: inductor gives its small per-GEMM scale and zero-point constants one shared original
    name, by which they cannot be told apart."""
    first: dict[tuple, torch.Tensor] = {}
    shared = released = 0
    for runner in runners:
        names = runner.get_constant_names_to_original_fqns()
        per_fqn = collections.Counter(names.values())
        constants = runner.extract_constants_map(False)  # keyed by original name
        repoint, dropped = {}, []
        for name, fqn in names.items():
            tensor = constants.get(fqn)
            if tensor is None or per_fqn[fqn] > 1 or not tensor.is_contiguous() or tensor.nbytes < mmap.PAGESIZE:
                continue
            kept = first.setdefault(_identity(tensor), tensor)
            if kept is not tensor and torch.equal(kept, tensor):
                repoint[name] = kept
                dropped.append(tensor)
        # user-managed: the runner reads the kept tensors in place; they live as long as their own runner
        runner.update_constant_buffer(repoint, False, False, True)
        shared += sum(tensor.nbytes for tensor in dropped)
        released += sum(_release(tensor) for tensor in dropped)
    return shared, released
