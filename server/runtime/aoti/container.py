"""An AOTInductor model container driven through the C interface its library exports.

Torch's own runners (``aoti_load_package``, ``AOTIModelContainerRunnerCpu``) hold the GIL while a step
runs, so the server's event loop stood still for every step: the first token's SSE chunk waited behind
the next decode step (about 26 ms of the served TTFT), and a long prefill made ``/health`` wait for all of
it. ctypes releases the GIL around each foreign call. Tensors cross the interface as ``AtenTensorHandle``s
(``at::Tensor*``), made and taken over by torch's own ``torch._C._aoti`` helpers.

Every function called is declared once, in ``PROTOTYPES``, as torch's ``aoti_runtime/interface.h`` and
``aoti_torch/c/shim.h`` declare it (``tests/test_torch_contract.py`` checks the table against those headers):
a wrong guess at a signature does not raise, it corrupts the stack.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from ctypes import POINTER, c_bool, c_char_p, c_size_t, c_void_p
from pathlib import Path

import torch

from server.runtime import heap

_capsules = ctypes.pythonapi
_capsules.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capsules.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsules.PyCapsule_New.restype = ctypes.py_object
_capsules.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Entry(ctypes.Structure):
    """``AOTInductorConstantMapEntry``: a constant's name and tensor handle."""

    _fields_ = [("name", c_char_p), ("handle", c_void_p)]


# name -> argument types; each returns an int32 error code (AOTIRuntimeError, AOTITorchError). Handles
# (containers, tensors, streams, proxy executors) are pointers.
PROTOTYPES: dict[str, list] = {
    "AOTInductorModelContainerCreateWithDevice": [POINTER(c_void_p), c_size_t, c_char_p, c_char_p],
    "AOTInductorModelContainerDelete": [c_void_p],
    "AOTInductorModelContainerRun": [
        c_void_p,
        POINTER(c_void_p),
        c_size_t,
        POINTER(c_void_p),
        c_size_t,
        c_void_p,
        c_void_p,
    ],
    "AOTInductorModelContainerGetNumOutputs": [c_void_p, POINTER(c_size_t)],
    "AOTInductorModelContainerGetNumConstants": [c_void_p, POINTER(c_size_t)],
    "AOTInductorModelContainerGetConstantName": [c_void_p, c_size_t, POINTER(c_char_p)],
    "AOTInductorModelContainerGetConstantOriginalFQN": [c_void_p, c_size_t, POINTER(c_char_p)],
    "AOTInductorModelContainerGetConstantFromFolded": [c_void_p, c_size_t, POINTER(c_bool)],
    "AOTInductorModelContainerExtractConstantsMapEntries": [
        c_void_p,
        POINTER(POINTER(_Entry)),
        POINTER(c_size_t),
        c_bool,
    ],
    "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs": [
        c_void_p,
        POINTER(_Entry),
        c_size_t,
        c_bool,
        c_bool,
    ],
    "AOTInductorModelUpdateConstantsFromBlob": [c_void_p, c_void_p],
    "AOTInductorGetLastError": [POINTER(c_char_p)],
    "aoti_torch_new_tensor_handle": [c_void_p, POINTER(c_void_p)],
    "aoti_torch_delete_tensor_object": [c_void_p],
}


def _declared(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    for name, argtypes in PROTOTYPES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int32
    return lib


def _handles(tensors: list[torch.Tensor]) -> list[int]:
    """New ``at::Tensor*`` handles sharing the tensors' storage; whoever takes them must free them."""
    capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)
    return [_capsules.PyCapsule_GetPointer(capsule, None) for capsule in capsules]


def _tensors(handles: list[int]) -> list[torch.Tensor]:
    """Tensors taking over ``handles``."""
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
        [_capsules.PyCapsule_New(handle, None, None) for handle in handles]
    )


UNMAP_EVERY_S = 0.02


@contextlib.contextmanager
def _unmapping_pages(address: int, size: int):
    """While the body runs (a foreign call, the GIL free), give back every ``UNMAP_EVERY_S`` the pages of the
    file mapped at ``address`` that it has read. A mapped page read stays resident in the process until the
    mapping goes: a whole span's constants on top of the container's copy of them, the largest part of a
    large model's loading peak. Dropping a page the copy still reads is harmless: the next read maps the
    same bytes again from the page cache (the mapping is private and never written)."""
    done = threading.Event()

    def unmap() -> None:
        while not done.wait(UNMAP_EVERY_S):
            heap.give_back(address, size)

    worker = threading.Thread(target=unmap, name="unmap-constants", daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()


class ContainerError(RuntimeError):
    """An AOTInductor call failed; the message is the container's own."""


class Container:
    """One compiled step's library and constants: ``run``, and what ``step_constants`` needs of them."""

    def __init__(self, library: Path, constants: Path) -> None:
        self._lib = lib = _declared(library)
        self._handle = c_void_p()
        self._user_managed: list[int] = []  # handles of constants the container reads in place
        self._owners: list = []  # what holds the memory of those constants
        self._check(
            lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(self._handle), 1, b"cpu", None), "create"
        )
        if Path(constants).stat().st_size:  # a step without constants has an empty blob
            self._load_constants(constants)
        outputs = c_size_t()
        self._check(lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(outputs)), "outputs")
        self._outputs = outputs.value

    def _load_constants(self, constants: Path) -> None:
        """Copied into the container's own allocation from the mapped file, whose pages are given back while
        it copies (``_unmapping_pages``), then unmapped."""
        with open(constants, "rb") as f:
            blob = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        start = ctypes.c_char.from_buffer(blob)
        try:
            with _unmapping_pages(ctypes.addressof(start), len(blob)):
                self._check(
                    self._lib.AOTInductorModelUpdateConstantsFromBlob(self._handle, ctypes.addressof(start)), "load"
                )
        finally:
            del start
            blob.close()

    def _check(self, error: int, what: str) -> None:
        if error:
            message = c_char_p()
            self._lib.AOTInductorGetLastError(ctypes.byref(message))
            raise ContainerError(f"AOTInductor {what}: {(message.value or b'no message').decode(errors='replace')}")

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's outputs; the GIL is free meanwhile. The container takes over the input handles and frees
        each after its last use, mid-step. A tensor's references falling to its Python object's alone make
        torch release that object, which takes the GIL: the step would stop there until the event loop let
        go of it. So each input has a second handle, ``held`` until the step is over and then freed here,
        with the GIL (kept in the capsules torch makes them in: no pointer is read out of them or put back)."""
        handles = (c_void_p * len(inputs))(*_handles(inputs))
        held = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(inputs)
        outputs = (c_void_p * self._outputs)()
        try:
            self._check(
                self._lib.AOTInductorModelContainerRun(
                    self._handle, handles, len(inputs), outputs, self._outputs, None, None
                ),
                "run",
            )
        finally:  # taken back as the inputs' own tensors: their extra references go without a wait
            torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(held)
        return _tensors(list(outputs))

    def constant_names(self) -> list[tuple[str, str]]:
        """By index, the name and original name of each constant the container holds (not folded at run time)."""
        count = c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumConstants(self._handle, ctypes.byref(count)), "count")
        names = []
        for i in range(count.value):
            name, original, folded = c_char_p(), c_char_p(), c_bool()
            self._check(
                self._lib.AOTInductorModelContainerGetConstantFromFolded(self._handle, i, ctypes.byref(folded)),
                "folded",
            )
            if folded.value:
                continue
            self._check(self._lib.AOTInductorModelContainerGetConstantName(self._handle, i, ctypes.byref(name)), "name")
            self._check(
                self._lib.AOTInductorModelContainerGetConstantOriginalFQN(self._handle, i, ctypes.byref(original)),
                "original name",
            )
            names.append((name.value.decode(), original.value.decode()))
        return names

    def constants(self) -> dict[str, torch.Tensor]:
        """The constants by name, as tensors viewing the container's memory: valid while the container lives.
        The container hands them out by original name, which inductor gives several constants (per-GEMM scales
        and zero points, a packed weight beside another weight), in the order of their indices: that order
        names each."""
        entries, count = POINTER(_Entry)(), c_size_t()
        self._check(
            self._lib.AOTInductorModelContainerExtractConstantsMapEntries(
                self._handle, ctypes.byref(entries), ctypes.byref(count), False
            ),
            "constants",
        )
        originals, handles = [], []
        for entry in entries[: count.value]:
            handle = c_void_p()  # a handle of our own: the container keeps owning its one
            self._check(self._lib.aoti_torch_new_tensor_handle(entry.handle, ctypes.byref(handle)), "new handle")
            originals.append(entry.name.decode())
            handles.append(handle.value)
        tensors, names = _tensors(handles), self.constant_names()
        if originals != [original for _, original in names]:
            raise ContainerError("AOTInductor handed out its constants in an order other than their indices'")
        return {name: tensor for (name, _), tensor in zip(names, tensors)}

    def use_in_place(self, constants: dict[str, torch.Tensor], owners: list = ()) -> None:
        """Read these tensors, by constant name, where they are instead of the container's own copies; they
        view memory of ``owners`` (other containers' steps), which are kept alive as long as this container."""
        if not constants:
            return
        self._owners += owners
        handles = _handles(list(constants.values()))
        self._user_managed += handles  # the container reads through them until it is deleted
        pairs = (_Entry * len(handles))(*[_Entry(name.encode(), handle) for name, handle in zip(constants, handles)])
        self._check(
            self._lib.AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(
                self._handle, pairs, len(handles), False, False
            ),
            "update constants",
        )

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.AOTInductorModelContainerDelete(self._handle)
            for handle in self._user_managed:
                self._lib.aoti_torch_delete_tensor_object(handle)
