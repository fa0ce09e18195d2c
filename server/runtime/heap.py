"""Memory given back to the OS: freed heap, and pages whose contents are no longer needed.

glibc keeps freed memory mapped for reuse, and raises its mmap threshold to the largest block freed, so
after a first long prompt a prefill's working buffers (hundreds of MB at 1B) come from the heap and stay
resident when the prefill is done. ``malloc_trim`` returns them, and the next prefill faults them in again
(page by page: a twentieth of a 512-token prompt's time on the default model), so the batcher trims when it
is idle, not after each prompt.
"""

from __future__ import annotations

import ctypes
import gc

_libc = ctypes.CDLL(None)
_MADV_DONTNEED = 4  # Linux


def trim() -> None:
    """Return the free pages of the heap to the OS (glibc only; elsewhere nothing happens)."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def release_garbage() -> None:
    """Collect unreachable objects (torch tensors in reference cycles among them), then ``trim``."""
    gc.collect()
    trim()


def give_back(address: int, length: int) -> bool:
    """Give the pages of ``[address, address + length)`` (page-aligned) back to the OS: anonymous ones read as
    zeros afterwards, those of a private file mapping not written to as the file again."""
    return _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED) == 0
