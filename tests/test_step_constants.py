"""Giving back the pages under a duplicated constant (only whole pages of its own, and really given back)
and those of a constants file while it is copied; which constants are found alike. (Sharing itself is checked
end to end in test_compiled_e2e: the compiled server, whose steps share their constants, gives the eager
server's greedy tokens.)"""

import mmap
import time
from pathlib import Path

import torch

from server.runtime.aoti import container
from server.runtime.aoti.constants import (
    SharedConstants,
    _identity,
    _release,
    inner_pages,
    release_constants,
    unused_constants,
)

PAGE = mmap.PAGESIZE


def test_inner_pages_are_the_whole_pages_inside_the_range():
    assert inner_pages(0, 3 * PAGE) == (0, 3 * PAGE)
    assert inner_pages(16, 3 * PAGE) == (PAGE, 2 * PAGE)  # the first page holds 16 bytes of a neighbour
    assert inner_pages(PAGE - 1, PAGE + 2) == (PAGE, PAGE)
    assert inner_pages(64, PAGE) == (PAGE, 0)  # no whole page: nothing to give back
    assert inner_pages(PAGE, 0) == (PAGE, 0)


def test_released_pages_read_as_zeros_and_the_bytes_around_them_are_kept():
    block = torch.full((8 * PAGE,), 7, dtype=torch.uint8)
    constant = block[100 : 100 + 5 * PAGE]  # starts mid-page, like a constant inside a package's blob
    start, length = inner_pages(constant.data_ptr(), constant.nbytes)
    assert _release(constant) == length == 4 * PAGE
    first = start - block.data_ptr()
    assert torch.all(block[first : first + length] == 0)  # the kernel's zero page: the memory was given back
    assert torch.all(block[:first] == 7) and torch.all(block[first + length :] == 7)


def _resident_file_bytes() -> int:
    """Of this process, the resident pages of mapped files."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def test_a_mapped_blob_is_given_back_while_it_is_copied_and_reads_the_same(tmp_path):
    """What a container's load does with its constants' file: pages read stay mapped no longer than
    ``UNMAP_EVERY_S``, and a page read after it was given back holds the file's bytes again."""
    size = 64 << 20
    data = torch.arange(size // 4, dtype=torch.int32)
    (tmp_path / "constants.blob").write_bytes(data.numpy().tobytes())
    with open(tmp_path / "constants.blob", "rb") as f:
        blob = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    view = torch.frombuffer(blob, dtype=torch.int32)
    before = _resident_file_bytes()
    with container._unmapping_pages(view.data_ptr(), size):
        assert torch.equal(view.clone(), data)  # reads every page
        time.sleep(10 * container.UNMAP_EVERY_S)
        assert _resident_file_bytes() - before < size // 4
        assert torch.equal(view.clone(), data)
    del view
    blob.close()


WRAPPER = """
    constants_info_[0].name = "packed";
    constants_info_[1].name = "raw";
    [[maybe_unused]] auto& packed = constants_->at(0);
    [[maybe_unused]] auto& raw = constants_->at(1);
    [[maybe_unused]] auto& rawer = constants_->at(2);
    cpp_fused_gemm_0((const int8_t*)(packed.data_ptr()), (float*)(buf0.data_ptr()));
    rawer_buf = rawer;
"""


def test_unused_constants_are_those_bound_but_never_passed_on():
    assert unused_constants(WRAPPER) == ["raw"]  # "rawer" is used; "raw" only appears inside other words


class FakeSpan:
    """A loaded span as ``SharedConstants`` sees it: constants by name, the unused ones, its container."""

    def __init__(self, constants: dict[str, torch.Tensor]) -> None:
        self.constants, self.unused, self.repointed = constants, set(), {}
        self.container = self

    def use_in_place(self, constants: dict[str, torch.Tensor], owners: list) -> None:
        self.repointed.update(constants)
        self.owners = owners


def test_opaque_onednn_constants_are_skipped_and_the_plain_duplicates_still_shared():
    """Weights prepacked by oneDNN (its INT8 qlinear on AMX and VNNI CPUs) have no storage Python can read:
    hashing one crashed the start-up of a compiled server on an AVX-512 VNNI EPYC."""
    weight = torch.randint(-127, 128, (256, 256), dtype=torch.int8)
    opaque = [torch.ops.onednn.qlinear_prepack(weight, None) for _ in range(2)]
    assert opaque[0].layout != torch.strided
    plain = torch.randn(4 * PAGE)
    decode = FakeSpan({"packed": opaque[0], "raw": plain})
    prefill = FakeSpan({"packed": opaque[1], "raw": plain.clone()})
    shared = SharedConstants()
    shared.add(decode)
    shared.add(prefill)
    assert shared.shared == plain.nbytes and set(prefill.repointed) == {"raw"} and prefill.repointed["raw"] is plain
    assert prefill.owners == [decode]  # the copy prefill reads lives as long as prefill
    assert release_constants({"packed": opaque[0]}, ["packed"]) == 0


def test_constants_alike_in_the_bytes_sampled_are_compared_whole():
    """The identity samples a constant's bytes; two that differ only between the samples are not shared, and a
    later copy of the second is shared with the second."""
    first = torch.zeros(100_000, dtype=torch.uint8)
    second = first.clone()
    second[5000] = 1  # between the first two runs of sampled bytes
    assert _identity(first) == _identity(second)
    spans = [FakeSpan({"x": tensor}) for tensor in (first, second, second.clone())]
    shared = SharedConstants()
    for span in spans:
        shared.add(span)
    assert not spans[1].repointed and spans[2].repointed["x"] is second and spans[2].owners == [spans[1]]
    assert shared.shared == second.nbytes
