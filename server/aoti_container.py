"""An AOTInductor model container driven through the C interface its library exports.

Torch's own runners (``aoti_load_package``, ``AOTIModelContainerRunnerCpu``) hold the GIL while a step
runs, so the server's event loop stood still for every step: the first token's SSE chunk waited behind
the next decode step (about 26 ms of the served TTFT), and a long prefill made ``/health`` wait for all of
it. ctypes releases the GIL around each foreign call. Tensors cross the interface as ``AtenTensorHandle``s
(``at::Tensor*``), made and taken over by torch's own ``torch._C._aoti`` helpers.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

_capsules = ctypes.pythonapi
_capsules.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capsules.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsules.PyCapsule_New.restype = ctypes.py_object
_capsules.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Entry(ctypes.Structure):
    """``AOTInductorConstantMapEntry``: a constant's name and tensor handle."""
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


def _handles(tensors: list[torch.Tensor]) -> list[int]:
    """New ``at::Tensor*`` handles sharing the tensors' storage; whoever takes them must free them."""
    capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)
    return [_capsules.PyCapsule_GetPointer(capsule, None) for capsule in capsules]


def _tensors(handles: list[int]) -> list[torch.Tensor]:
    """Tensors taking over ``handles``."""
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
        [_capsules.PyCapsule_New(handle, None, None) for handle in handles])


class Container:
    """One compiled step's library and constants: ``run``, and what ``step_constants`` needs of them."""

    def __init__(self, library: Path, constants: Path) -> None:
        self._lib = lib = ctypes.CDLL(str(library))
        lib.AOTInductorGetLastError.restype = ctypes.c_char_p
        self._handle = ctypes.c_void_p()
        self._check(lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(self._handle), ctypes.c_size_t(1),
                                                                  b"cpu", None), "create")
        self._user_managed: list[int] = []  # handles of constants the container reads in place
        with open(constants, "rb") as f:  # copied into the container's own allocation, then unmapped
            blob = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        start = ctypes.c_char.from_buffer(blob)
        try:
            self._check(lib.AOTInductorModelUpdateConstantsFromBlob(self._handle, ctypes.byref(start)), "load")
        finally:
            del start
            blob.close()
        outputs = ctypes.c_size_t()
        self._check(lib.AOTInductorModelContainerGetNumOutputs(self._handle, ctypes.byref(outputs)), "outputs")
        self._outputs = outputs.value

    def _check(self, error: int, what: str) -> None:
        if error:
            raise RuntimeError(f"AOTInductor {what}: {(self._lib.AOTInductorGetLastError() or b'').decode()}")

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's outputs; the GIL is free meanwhile. The container takes over the input handles."""
        handles = (ctypes.c_void_p * len(inputs))(*_handles(inputs))
        outputs = (ctypes.c_void_p * self._outputs)()
        self._check(self._lib.AOTInductorModelContainerRun(self._handle, handles, ctypes.c_size_t(len(inputs)),
                                                           outputs, ctypes.c_size_t(self._outputs), None, None),
                    "run")
        return _tensors(list(outputs))

    def constant_names(self) -> dict[str, tuple[str, int]]:
        """Each constant's name, original name (inductor gives several constants the same one) and bytes."""
        count = ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerGetNumConstants(self._handle, ctypes.byref(count)), "count")
        names = {}
        for i in range(count.value):
            name, original, size = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_size_t()
            index = ctypes.c_size_t(i)
            self._check(self._lib.AOTInductorModelContainerGetConstantName(self._handle, index, ctypes.byref(name)),
                        "name")
            self._check(self._lib.AOTInductorModelContainerGetConstantOriginalFQN(self._handle, index,
                                                                                  ctypes.byref(original)),
                        "original name")
            self._check(self._lib.AOTInductorModelContainerGetConstantDataSize(self._handle, index,
                                                                               ctypes.byref(size)), "size")
            names[name.value.decode()] = (original.value.decode(), size.value)
        return names

    def constants(self) -> dict[str, torch.Tensor]:
        """The constants by original name (one of those sharing a name), as tensors viewing the container's
        memory: valid while the container lives."""
        entries, count = ctypes.POINTER(_Entry)(), ctypes.c_size_t()
        self._check(self._lib.AOTInductorModelContainerExtractConstantsMapEntries(
            self._handle, ctypes.byref(entries), ctypes.byref(count), ctypes.c_bool(False)), "constants")
        names, handles = [], []
        for entry in entries[:count.value]:
            handle = ctypes.c_void_p()  # a handle of our own: the container keeps owning its one
            self._check(self._lib.aoti_torch_new_tensor_handle(ctypes.c_void_p(entry.handle), ctypes.byref(handle)),
                        "new handle")
            names.append(entry.name.decode())
            handles.append(handle.value)
        return dict(zip(names, _tensors(handles)))

    def use_in_place(self, constants: dict[str, torch.Tensor]) -> None:
        """Read these tensors, by constant name, where they are instead of the container's own copies."""
        if not constants:
            return
        handles = _handles(list(constants.values()))
        self._user_managed += handles  # the container reads through them until it is deleted
        pairs = (_Entry * len(handles))(*[_Entry(name.encode(), handle) for name, handle in zip(constants, handles)])
        self._check(self._lib.AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(
            self._handle, pairs, ctypes.c_size_t(len(handles)), ctypes.c_bool(False), ctypes.c_bool(False)),
            "update constants")

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.AOTInductorModelContainerDelete(self._handle)
            for handle in self._user_managed:
                self._lib.aoti_torch_delete_tensor_object(ctypes.c_void_p(handle))
