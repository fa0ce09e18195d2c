"""The parts of torch that q8chat's compiled steps rely on beyond its public API, checked against the
installed torch: AOTInductor's C interface as its headers declare it, inductor's settings, the helpers that
move tensors across the C boundary, and the form of the generated wrapper that the unused-constants search
reads. A torch upgrade that changes any of them fails here, in seconds, instead of in a crash at start-up."""

import ctypes
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from server.runtime.aoti import container as aoti_container
from server.runtime.aoti import int8_gemm
from server.runtime.aoti import steps as compiled_step
from server.runtime.aoti.container import PROTOTYPES, Container, ContainerError

HEADERS = Path(torch.__file__).parent / "include/torch/csrc/inductor"
C_TYPES = {  # the C parameter types of the functions we call, as ctypes declares them
    "size_t": ctypes.c_size_t,
    "bool": ctypes.c_bool,
    "const char*": ctypes.c_char_p,
    "const char**": ctypes.POINTER(ctypes.c_char_p),
    "size_t*": ctypes.POINTER(ctypes.c_size_t),
    "bool*": ctypes.POINTER(ctypes.c_bool),
    "const uint8_t*": ctypes.c_void_p,
    "AOTInductorModelContainerHandle": ctypes.c_void_p,
    "AOTInductorModelContainerHandle*": ctypes.POINTER(ctypes.c_void_p),
    "AtenTensorHandle": ctypes.c_void_p,
    "AtenTensorHandle*": ctypes.POINTER(ctypes.c_void_p),
    "AOTInductorStreamHandle": ctypes.c_void_p,
    "AOTIProxyExecutorHandle": ctypes.c_void_p,
    "const AOTInductorConstantMapEntry*": ctypes.POINTER(aoti_container._Entry),
    "const AOTInductorConstantMapEntry**": ctypes.POINTER(ctypes.POINTER(aoti_container._Entry)),
}


def declared_parameters(name: str) -> list[str]:
    """The parameter types of ``name`` as torch's AOTInductor headers declare it."""
    source = (HEADERS / "aoti_runtime/interface.h").read_text() + (HEADERS / "aoti_torch/c/shim.h").read_text()
    source = re.sub(r"//[^\n]*", "", source)
    match = re.search(rf"\b(AOTIRuntimeError|AOTITorchError)\s+{name}\s*\(([^)]*)\)\s*;", source)
    assert match, f"{name} is not declared in torch's AOTInductor headers"
    parameters = [" ".join(p.split()[:-1]).replace(" *", "*") for p in match.group(2).split(",") if p.strip()]
    return [re.sub(r"\s*\*", "*", p) for p in parameters]


@pytest.mark.parametrize("name", sorted(PROTOTYPES))
def test_each_c_function_is_declared_as_the_headers_declare_it(name):
    declared = [C_TYPES[p] for p in declared_parameters(name)]
    assert declared == PROTOTYPES[name], f"{name}: headers say {declared_parameters(name)}"


def test_inductor_settings_and_the_tensor_handle_helpers_exist():
    import torch._inductor.config as inductor

    for name in compiled_step.INDUCTOR_SETTINGS:
        section, _, leaf = name.rpartition(".")
        assert hasattr(getattr(inductor, section) if section else inductor, leaf), name
    for helper in ("unsafe_alloc_void_ptrs_from_tensors", "alloc_tensors_by_stealing_from_void_ptrs"):
        assert hasattr(torch._C._aoti, helper)
    compiled_step.forget_traces()  # the export state it clears (a renamed one raises)


def test_inductors_onednn_lowerings_add_onednn_only_where_use_aten_gemm_kernels_says_or_no_template_fits():
    """What leaving oneDNN's GEMMs out of a build relies on (``steps.onednn_gemms``): each of inductor's oneDNN
    GEMM lowerings asks its module's ``use_aten_gemm_kernels`` before adding oneDNN's choice."""
    import inspect

    compiled_step.configure_inductor()
    from torch._inductor import mkldnn_lowerings

    assert callable(mkldnn_lowerings.use_aten_gemm_kernels)
    source = inspect.getsource(mkldnn_lowerings)
    assert source.count("if len(choices) == 0 or use_aten_gemm_kernels():") >= 4  # linear, qlinear, both binary


def test_the_one_row_micro_kernel_is_registered_once_beside_inductors_own():
    compiled_step.configure_inductor()
    compiled_step.configure_inductor()
    from torch._inductor.codegen import cpp_micro_gemm as micro  # after inductor's template machinery

    ours = [
        c
        for c in micro.micro_gemm_configs[micro.CppMicroGemmFP32Vec]
        if tuple(c.register_blocking) == compiled_step.ONE_ROW_BLOCKING
    ]
    assert len(ours) == 1 and ours[0].input_dtype == torch.bfloat16 and ours[0].input2_dtype == torch.int8
    assert ours[0].extra_check(ours[0], 1, 3072, 576, 1, 2) and not ours[0].extra_check(ours[0], 2, 3072, 576, 1, 2)


@pytest.mark.parametrize(
    ("isa", "blockings"), [("avx2", int8_gemm.AVX2_BLOCKINGS), ("avx512_vnni", int8_gemm.AVX512_VNNI_BLOCKINGS)]
)
def test_each_int8_micro_kernel_is_registered_once_for_s8s8_on_its_isa_in_the_vnni4_layout(isa, blockings):
    compiled_step.configure_inductor()
    from torch._inductor.codegen import cpp_micro_gemm as micro
    from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512VNNI

    ours = int8_gemm.register()[isa]
    assert int8_gemm.register()[isa] is ours
    configs = micro.micro_gemm_configs[ours]
    vec_isa = {"avx2": VecAVX2, "avx512_vnni": VecAVX512VNNI}[isa]
    assert {(c.vec_isa_cls, c.input_dtype, c.input2_dtype, c.output_dtype) for c in configs} == {
        (vec_isa, torch.int8, torch.int8, torch.int32)
    }
    assert {tuple(c.register_blocking) for c in configs} == set(blockings)
    one_row = [c for c in configs if c.register_blocking.block_m == 1]
    assert [c.extra_check(c, 1, 960, 576, 1, 2) for c in one_row] == [True]
    assert not one_row[0].extra_check(one_row[0], 1, 960, 576, 1, 2, dynamic_M=True)  # a prefill's M
    assert (
        micro.LayoutType.VNNI4
        == ours("g", torch.int8, torch.int8, torch.int32, torch.int32, configs[0].register_blocking).get_b_layout()
    )


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(1, 2, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.fixture(scope="module")
def tiny_step(tmp_path_factory):
    directory = tmp_path_factory.mktemp("step") / "scaled"
    with torch.no_grad():
        program = torch.export.export(Scaled(), (torch.ones(4, 64),))
    compiled_step.compile_program(program, directory)
    return directory


def test_a_container_runs_and_a_container_error_raises_with_its_message(tiny_step, monkeypatch):
    monkeypatch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")  # the wrapper checks its inputs (read at its first run)
    container = Container(tiny_step / compiled_step.LIBRARY, tiny_step / compiled_step.CONSTANTS)
    assert torch.equal(container.run([torch.ones(4, 64)])[0], Scaled()(torch.ones(4, 64)))
    with pytest.raises(ContainerError, match="AOTInductor run: .*dtype"):  # not a crash
        container.run([torch.ones(4, 64, dtype=torch.float64)])
    assert torch.equal(container.run([torch.ones(4, 64)])[0], Scaled()(torch.ones(4, 64)))  # and it still runs
    assert set(container.constants()) == {"scale"}


def test_the_wrapper_binds_constants_in_the_form_the_unused_constants_search_reads(tmp_path):
    from server.runtime.aoti.constants import unused_constants

    with torch.no_grad():
        program = torch.export.export(Scaled(), (torch.ones(4, 64),))
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "step.pt2"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "step.pt2") as archive:
        wrapper = next(archive.read(m).decode() for m in archive.namelist() if m.endswith(".wrapper.cpp"))
    assert re.search(r"auto& \w+ = constants_->at\(\d+\);", wrapper)
    assert unused_constants(wrapper) == []  # the one constant is passed to the kernel


def test_a_builds_copy_of_its_constants_in_inductors_cache_is_deleted(tmp_path):
    """AOTInductor leaves a copy of each build's constants in inductor's cache directory, never pruned: a 7B
    model's first start left 15 GB in /tmp and filled the disk. Once packaged, it is deleted."""
    import zipfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    compiled_step.configure_inductor()  # constants in a blob beside the library, as the steps are built
    with torch.no_grad():
        program = torch.export.export(Scaled(), (torch.ones(4, 64),))
    package = tmp_path / "step.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    with zipfile.ZipFile(package) as archive:
        blob = next(Path(m).name for m in archive.namelist() if m.endswith("_weights.blob"))
    assert list(Path(cache_dir()).glob(f"*/{blob}"))  # what torch leaves behind
    assert compiled_step._drop_cached_constants(package) > 0
    assert not list(Path(cache_dir()).glob(f"*/{blob}"))
