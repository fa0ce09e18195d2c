"""Compiled steps' constants files are read into the page cache ahead of their loading."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import time
from pathlib import Path

import pytest

from server.runtime.aoti.read_ahead import DEFAULT_WINDOW, constant_files, read_ahead, window
from server.runtime.aoti.steps import CONSTANTS, SPANS

_libc = ctypes.CDLL(None, use_errno=True)


def resident_share(path: Path) -> float:
    """The share of the file's pages in the page cache (``mincore`` over a private mapping of it, never
    written)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    start = ctypes.c_char.from_buffer(mapped)
    try:
        pages = (len(mapped) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        flags = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(len(mapped)), flags):
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(flag & 1 for flag in flags) / pages
    finally:
        del start
        mapped.close()


def package(root: Path, name: str, spans: int, size: int) -> Path:
    """A step package's layout as ``steps`` writes it: ``spans.json`` and each span's constants file."""
    path = root / name
    path.mkdir()
    (path / SPANS).write_text(json.dumps([[i, i + 1] for i in range(spans)]))
    for index in range(spans):
        (path / str(index)).mkdir()
        with open(path / str(index) / CONSTANTS, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
    return path


def test_files_come_in_load_order_and_a_package_without_spans_is_skipped(tmp_path):
    decode, prefill = package(tmp_path, "decode", 2, 1), package(tmp_path, "prefill", 3, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    expected = [decode / "0" / CONSTANTS, decode / "1" / CONSTANTS] + [prefill / str(i) / CONSTANTS for i in range(3)]
    assert list(constant_files([decode, broken, prefill])) == expected


def test_a_window_is_what_one_call_reads_on_the_files_disk(tmp_path):
    assert window(os.makedev(0, 0)) == DEFAULT_WINDOW  # no block device: an overlay or a memory file system
    device = os.stat(tmp_path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    queue = queue / "queue" if (queue / "queue").is_dir() else queue / ".." / "queue"
    if not queue.is_dir():
        pytest.skip("the test's files are on no block device sysfs lists")
    limits = [int((queue / name).read_text()) << 10 for name in ("read_ahead_kb", "max_sectors_kb")]
    assert window(device) == max(limits)


def test_read_ahead_brings_every_window_of_the_files_into_the_page_cache(tmp_path):
    # two windows and a partial third: past what one call for the whole file reads
    step = package(tmp_path, "decode", 2, 2 * window(os.stat(tmp_path).st_dev) + 12345)
    files = list(constant_files([step]))
    for path in files:  # out of the page cache (clean pages, synced above)
        descriptor = os.open(path, os.O_RDONLY)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)
    if max(resident_share(path) for path in files) > 0.5:
        pytest.skip("this file system keeps the files' pages (tmpfs?): nothing to read ahead")
    read_ahead([step]).join(30)
    deadline = time.monotonic() + 30  # the reads are issued, not awaited
    while min(resident_share(path) for path in files) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [resident_share(path) for path in files] == [1.0, 1.0]
