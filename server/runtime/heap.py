"""Freed heap given back to the OS.

glibc keeps freed memory mapped for reuse, and raises its mmap threshold to the largest block freed, so
after a first long prompt a prefill's working buffers (hundreds of MB at 1B) come from the heap and stay
resident when the prefill is done. ``malloc_trim`` returns them; the next long prefill faults them in
again, a few milliseconds against its hundreds.
"""

from __future__ import annotations

import ctypes
import gc

_libc = ctypes.CDLL(None)


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
