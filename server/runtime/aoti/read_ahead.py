"""Compiled steps' constants read from disk ahead of their loading.

A start copies each span's constants out of its file (``Container``). From a cold page cache (after a reboot,
or once other work has pushed the files out) that copy waits on the disk a page fault at a time, and a 7B
model's two steps are 13 GB of files, most of a cold restart's time. A thread of its own asks the kernel to
read the files (``POSIX_FADV_WILLNEED``) in the order they are loaded, so that the disk works while earlier
spans are copied and compared. For one such call the kernel reads no more than the larger of the disk's
read-ahead size and its largest request, so the files are asked for in windows of that size (``window``):
larger windows read only their start, smaller ones cost more calls and smaller reads. Pages read ahead are
the page cache's, which the kernel takes back under memory pressure: at worst a page is read twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from server.runtime.aoti.steps import CONSTANTS, SPANS

log = logging.getLogger(__name__)
DEFAULT_WINDOW = 128 << 10  # Linux's default read-ahead, for files on no block device of their own


def constant_files(packages: list[Path]) -> Iterator[Path]:
    """Each package's span constants files, in the order the packages and their spans are loaded. A package
    without a readable span list yields nothing: its load fails with its own message."""
    for package in packages:
        try:
            spans = json.loads((package / SPANS).read_text())
        except (OSError, ValueError):
            continue
        yield from (package / str(index) / CONSTANTS for index in range(len(spans)))


def window(device: int) -> int:
    """The bytes one read-ahead call reads at most from block device ``device`` (``st_dev``): the larger of its
    read-ahead size and its largest request, from sysfs (a partition's are its disk's); ``DEFAULT_WINDOW`` for
    a device sysfs does not list (overlay and memory file systems)."""
    device_dir = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (device_dir / "queue", device_dir / ".." / "queue"):
        try:
            return max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb")) << 10
        except (OSError, ValueError):
            continue
    return DEFAULT_WINDOW


def read_ahead(packages: list[Path]) -> threading.Thread:
    """Start reading the packages' constants files into the page cache, one after another, on a daemon
    thread (returned, started); files that cannot be opened are skipped."""

    def run() -> None:
        for path in constant_files(packages):
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                status = os.fstat(descriptor)
                step = window(status.st_dev)
                for offset in range(0, status.st_size, step):
                    os.posix_fadvise(descriptor, offset, step, os.POSIX_FADV_WILLNEED)  # reads issued, not awaited
            except OSError as exc:  # a file system without read-ahead: loading reads it as before
                log.debug("no read-ahead for %s: %s", path, exc)
            finally:
                os.close(descriptor)

    thread = threading.Thread(target=run, name="read-ahead-constants", daemon=True)
    thread.start()
    return thread
