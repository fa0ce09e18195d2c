"""The compact model's steps compiled ahead of time by AOTInductor, kept as packages on disk.

Two steps: ``decode`` (one token, attended length symbolic) and ``prefill`` (2 or more tokens, count and
attended length symbolic). A single graph with a symbolic token count decodes 20 % slower, so each gets its
own. A server that decodes several sequences at once adds ``batch``: one token of each of its
slots. The first start exports them, lets inductor freeze the INT8 weights, prepack them for oneDNN and pick
its GEMM templates (VNNI here, AMX where the CPU has it), and keeps each step's library and constants in a
directory; later starts load them in a second or two. A large model's step is built a span of layers at a
time (``layer_spans``), each span a library of its own, run one after another: a build holds several copies
of the weights it compiles. ``torch.compile`` cannot be cached this way: its
graph cache refuses graphs holding oneDNN-prepacked weights, so every start lowered the whole model again
(about 50 s on 2 cores).

A step is keyed by everything its machine code depends on: the checkpoint, the context length and KV cache
type, torch, the CPU's ISA, the thread count (inductor bakes it into its parallel loops) and the source of
the compact model; steps that other code built are removed once unused for a day (``prune_stale``). The KV
caches are arguments, written in place: the steps hold no copy of them (a copy would be the whole cache's
zeros per step), and eager and compiled steps share one cache.

A step is loaded into an AOTInductor model container driven through its C interface (``aoti_container``)
rather than with ``aoti_load_package``: it runs without holding the GIL, and it hands out the constants,
which ``step_constants`` needs to keep one copy of those the two steps have in common and none of those no
kernel reads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

from quant import int8, kernels
from quant.kernels import bf16_prompt_gemm
from quant.load import fingerprint
from server.runtime import attention_op, compact, heap, static_llama, static_mpt
from server.runtime.aoti import attention, bf16_pairs_gemm, int8_gemm, micro_gemm, weight_only
from server.runtime.aoti import constants as step_constants
from server.runtime.aoti import kernels as step_kernels
from server.runtime.aoti.constants import SharedConstants, release_constants, unused_constants
from server.runtime.aoti.container import Container
from server.runtime.placement import cpu_isa

log = logging.getLogger(__name__)
_SOURCES = (
    int8.__file__,
    kernels.__file__,
    compact.__file__,
    attention_op.__file__,
    attention.__file__,
    static_llama.__file__,
    static_mpt.__file__,
    step_constants.__file__,
    step_kernels.__file__,
    int8_gemm.__file__,
    bf16_pairs_gemm.__file__,
    micro_gemm.__file__,
    weight_only.__file__,
    __file__,
)
STEPS = kernels.STEPS
BATCH = "batch"  # the batched decode step, with the decode step's W8A8 kernel
LIBRARY, CONSTANTS, UNUSED, SOURCE = "step.so", "constants.blob", "unused-constants.json", "source.sha256"
KERNELS, SPANS = "kernels.json", "spans.json"
STALE_AFTER_S = 24 * 3600


@functools.cache
def source_digest() -> str:
    """Of the code a step's machine code comes from (part of its key); read once, as the code is loaded once."""
    return hashlib.sha256(b"".join(hashlib.sha256(Path(f).read_bytes()).digest() for f in _SOURCES)).hexdigest()


def steps_of(slots: int) -> tuple[str, ...]:
    """The steps a decoder with caches for ``slots`` sequences runs."""
    return STEPS + ((BATCH,) if slots > 1 else ())


def kernel_of(kernels: dict[str, str], step: str) -> str:
    """``step``'s W8A8 kernel of ``kernels`` (by step name): the batch step's is the decode step's, so a
    sequence computes the same alone or batched."""
    return kernels["decode" if step == BATCH else step]


def package_paths(
    cache_dir: Path,
    checkpoint: Path,
    max_len: int,
    kernels: dict[str, str],
    kv_dtype: torch.dtype = compact.DEFAULT_KV_DTYPE,
    slots: int = 1,
) -> dict[str, Path]:
    """The directories of the compiled steps of this checkpoint, context length, KV cache type and W8A8 kernel
    of each step (``kernels`` by step name), for this machine and code; with ``slots`` sequences, the batched
    decode step's too (keyed by their number)."""
    facts = {
        "checkpoint": fingerprint(Path(checkpoint)),
        "max_len": max_len,
        "kv_dtype": str(kv_dtype),
        "torch": torch.__version__,
        "isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        # what a prompt step's weight-only layers run (quant.int8): this CPU's part; the checkpoint's decides the rest
        "bf16_gemm": bf16_prompt_gemm(),
        "source": source_digest(),
    }

    def key(step: str) -> str:
        own = {"kernel": kernel_of(kernels, step)} | ({"slots": slots} if step == BATCH else {})
        return hashlib.sha256(json.dumps(facts | own, sort_keys=True).encode()).hexdigest()[:16]

    return {step: Path(cache_dir).expanduser() / "compiled" / f"{step}-{key(step)}" for step in steps_of(slots)}


def prune_stale(directory: Path, now: float | None = None) -> tuple[int, int]:
    """Remove the steps in ``directory`` that other q8chat code built (their key names that code: this one
    never loads them), packages of the format before directories included, once no server has loaded them
    for a day: that spares a server of another version sharing the cache. Returns (steps removed, bytes)."""
    current, now = source_digest(), time.time() if now is None else now
    removed = freed = 0
    for entry in directory.iterdir() if directory.is_dir() else ():
        if entry.name.partition("-")[0] not in steps_of(2) or not (entry.is_dir() or entry.suffix == ".pt2"):
            continue
        stamp = entry / SOURCE
        source = stamp.read_text() if stamp.is_file() else None  # None: a .pt2, or a step before stamps
        if source == current or now - (stamp if source else entry).stat().st_mtime < STALE_AFTER_S:
            continue
        if entry.is_dir():
            freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry)
        else:
            freed += entry.stat().st_size
            entry.unlink()
        removed += 1
    return removed, freed


# Inductor's settings for the steps (names as in ``torch._inductor.config``). Freezing turns weights into
# constants, which lets inductor prepack the INT8 ones for oneDNN; max-autotune picks between oneDNN and
# inductor's own GEMM templates. Constants go to a file beside the library, read into memory at load: inside
# the library they stayed mapped and resident after AOTInductor copied them out (150 MB per package for the
# default model). No timing table per GEMM on stderr: the build's log says what ran (``step_kernels``).
INDUCTOR_SETTINGS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


# What the GEMMs of steps that multiply a few rows (decode, batch) are chosen from: inductor's templates only.
# Max-autotune times each GEMM alone, its weights in cache, where ATen's one-row weight-only kernel often
# looked fastest; inside a step, reading its weights from memory, the template was faster (a Zen 5 EPYC's
# decode step: 5.1-5.3 ms with templates alone against 5.6-5.8 with half of them ATen's).
FEW_ROWS_GEMM_BACKENDS = "CPP"


def onednn_gemms(kernel: str) -> bool:
    """Whether max-autotune may choose oneDNN's GEMMs (its ``linear`` and ``qlinear``) for a step whose W8A8
    kernel is ``kernel``. Not for ``s8s8`` on a CPU without AMX: oneDNN's prepacked s8s8 matmul runs its
    reference kernel on AVX-512 VNNI (timing it at a 7B prompt's shapes kept a span's build busy for more than
    15 minutes, Zen 4 EPYC, 2 cores) and a generic one on AVX2, where q8chat's micro-kernels multiply. They then
    run only where no template fits."""
    return kernel != "s8s8" or kernels.amx_int8()


@contextlib.contextmanager
def _onednn_gemm_choices(allowed: bool):
    """Inside it, oneDNN's GEMMs are among max-autotune's choices as configured if ``allowed``, else only where
    no template fits (each of inductor's oneDNN lowerings asks ``use_aten_gemm_kernels`` so)."""
    if allowed:
        yield
        return
    from torch._inductor import mkldnn_lowerings

    with mock.patch.object(mkldnn_lowerings, "use_aten_gemm_kernels", lambda: False):
        yield


def configure_inductor() -> None:
    """Apply ``INDUCTOR_SETTINGS``: process-wide, as freezing is not honoured as a per-compile option."""
    import torch._inductor.config as inductor

    for name, value in INDUCTOR_SETTINGS.items():
        section, _, leaf = name.rpartition(".")
        setattr(getattr(inductor, section) if section else inductor, leaf, value)
    _register_one_row_micro_kernel()
    int8_gemm.register()
    bf16_pairs_gemm.register()
    attention.register()
    weight_only.register()


ONE_ROW_BLOCKING = (1, 64, 64)  # rows, columns, depth of the one-row AVX2 weight-only micro-kernel


def _register_one_row_micro_kernel() -> None:
    """A one-row (decode) blocking for inductor's AVX2 BF16 x INT8 micro-kernel, which the bf16 kernel's
    GEMVs run: its own blockings give one row 16 columns, two FMA chains per k, and the chains' latency
    bound it; 64 columns give eight. 25-30 % faster on this model's decode GEMVs on an AVX2 EPYC
    (576x3072: 97 against 139 us). Registered once per process, beside inductor's own."""
    from torch._inductor.cpu_vec_isa import VecAVX2

    micro = micro_gemm.inductor_micro_gemm()

    def one_row(config, m, *args, **kwargs) -> bool:
        return m == 1 and micro.check_int8_woq_small_m_dim(config, m, *args, **kwargs)

    configs = micro.micro_gemm_configs[micro.CppMicroGemmFP32Vec]
    if any(c.vec_isa_cls is VecAVX2 and tuple(c.register_blocking) == ONE_ROW_BLOCKING for c in configs):
        return
    configs += micro.generate_gemm_config(
        VecAVX2,
        [ONE_ROW_BLOCKING],
        input_dtype=torch.bfloat16,
        input2_dtype=torch.int8,
        output_dtype=torch.float,
        compute_dtype=torch.float,
        extra_check=one_row,
    )


# The size of the example a step is exported with, in tokens: a prompt's length, or how far into the cache a
# decode step attends. Inductor sizes its loops' threads by the example's shapes and times the GEMMs it
# chooses from at them: with a 4-token prompt and 16 attended positions, it chose GEMMs for 4 rows and ran
# a decode step's softmax on one thread.
EXAMPLE_TOKENS = 512


def _inputs(net: torch.nn.Module, rows: int, tokens: int) -> torch.Tensor:
    """Example inputs of ``net``: token ids, or for a later ``layer_span`` hidden states (random, so that a
    constant left out changes its output)."""
    if net.embed is not None:
        return torch.zeros(rows, tokens, dtype=torch.long)
    return torch.randn(rows, tokens, net.hidden_size, generator=torch.Generator().manual_seed(0))


def _example(net: torch.nn.Module, step: str, kv_dtype: torch.dtype, slots: int) -> tuple[tuple, tuple]:
    """Example arguments of ``step`` and their dynamic shapes: ``decode`` takes one token at a position > 0,
    ``prefill`` 2 or more tokens, ``batch`` a token for each of ``slots`` sequences; the attended length is
    symbolic up to the cache size (a whole number of attention blocks for one token a sequence). The example
    is ``EXAMPLE_TOKENS`` long, as far as the cache allows."""
    blocks = torch.export.Dim("blocks", min=1, max=compact.decode_width(net.max_len - 1) // compact.ATTENTION_BLOCK)
    width = compact.ATTENTION_BLOCK * blocks
    caches = compact.new_kv_caches(net.config, net.max_len, kv_dtype, slots if step == BATCH else 1, len(net.blocks))
    fixed = [None] * len(caches)  # the caches' shapes do not change
    size = max(2, min(EXAMPLE_TOKENS, net.max_len - 2))
    if step == BATCH:
        pos, mask = compact.batch_mask(net.max_len, [size] * slots)
        return (_inputs(net, slots, 1), pos, mask, caches), (None, None, {1: width}, fixed)
    start, tokens = (size, 1) if step == "decode" else (1, size)
    example = (
        _inputs(net, 1, tokens),
        torch.arange(start, start + tokens),
        compact.attention_mask(net.max_len, start, tokens, compiled=True),
        caches,
    )
    if step == "decode":
        return example, (None, None, {1: width}, fixed)
    count = torch.export.Dim("tokens", min=2, max=net.max_len)
    length = torch.export.Dim("attended", min=2, max=net.max_len)
    return example, ({1: count}, {0: count}, {0: count, 1: length}, fixed)


def buffers_as_parameters(net: torch.nn.Module) -> None:
    """Register ``net``'s buffers (the INT8 layers' weights and scales) as parameters without gradients, in
    place. AOTInductor clones every buffer before freezing, as a step might write to it: a second copy of the
    weights for the whole build. No step writes to one (the KV caches are arguments)."""
    for module in net.modules():
        for name, tensor in list(module._buffers.items()):
            if tensor is not None:
                del module._buffers[name]
                module._non_persistent_buffers_set.discard(name)
                module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def export_step(net: torch.nn.Module, example: tuple, dynamic: tuple) -> torch.export.ExportedProgram:
    buffers_as_parameters(net)
    with torch.no_grad():
        program = torch.export.export(net, example, dynamic_shapes=dynamic)
    # Export checks the dtype of every ``.to()`` result with an assert node. Such a node is a second user of
    # the INT8 matmul, which keeps inductor's oneDNN pattern from matching (decode fell from 120 to 85 tok/s);
    # inductor removes these asserts itself, but only after those patterns ran.
    for node in list(program.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            program.graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _unpack(package: Path, directory: Path) -> tuple[list[str], dict[str, int]]:
    """Of an AOTInductor package, the two files a container loads (library, constants) into ``directory``;
    returns the constants its wrapper does not use, and what its GEMMs run (``step_kernels``)."""
    wanted = {".wrapper.so": LIBRARY, "_weights.blob": CONSTANTS}
    sources = {".wrapper.cpp": "", ".kernel.cpp": ""}
    directory.mkdir()
    with zipfile.ZipFile(package) as archive:
        for member in archive.namelist():
            for ending in sources:
                if member.endswith(ending):
                    sources[ending] += archive.read(member).decode()
            for ending, name in wanted.items():
                if member.endswith(ending):
                    with archive.open(member) as source, open(directory / name, "wb") as target:
                        shutil.copyfileobj(source, target)
    missing = [name for name in wanted.values() if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"the AOTInductor package lacks {', '.join(missing)}")
    wrapper, kernel = sources[".wrapper.cpp"], sources[".kernel.cpp"]
    return unused_constants(wrapper), step_kernels.gemm_kernels(kernel, wrapper)


def compile_program(
    program: torch.export.ExportedProgram,
    directory: Path,
    few_rows: bool = False,
    stored_rows: bool = False,
    onednn: bool = True,
) -> tuple[list[str], dict[str, int]]:
    """AOT-compile ``program`` (inductor configured by ``configure_inductor``; ``few_rows``: a decode step's,
    its GEMMs from ``FEW_ROWS_GEMM_BACKENDS``; ``stored_rows``: its weight-only GEMMs by ATen's kernel,
    ``weight_only``; ``onednn``: oneDNN's GEMMs among the choices, ``onednn_gemms``) into ``directory``: the
    library and constants a ``Container`` loads. Returns the constants its wrapper does not use, and what its
    GEMMs run (``step_kernels``)."""
    import torch._inductor.config as inductor

    configure_inductor()
    directory.parent.mkdir(parents=True, exist_ok=True)
    backends = FEW_ROWS_GEMM_BACKENDS if few_rows else INDUCTOR_SETTINGS["max_autotune_gemm_backends"]
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".compiling-") as scratch:
        package = Path(scratch) / "step.pt2"
        with (
            torch.no_grad(),  # freezing: inference only
            inductor.patch(max_autotune_gemm_backends=backends),
            weight_only.from_stored_rows(stored_rows),
            _onednn_gemm_choices(onednn),
        ):
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
        _drop_cached_constants(package)
        return _unpack(package, directory)


def _drop_cached_constants(package: Path) -> int:
    """Delete what AOTInductor left of ``package``'s constants in inductor's cache directory: a copy of every
    build's constants, never pruned (15 GB for a 7B model's two steps), which no later build reads. Returns
    the bytes deleted."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    with zipfile.ZipFile(package) as archive:
        names = [Path(member).name for member in archive.namelist() if member.endswith("_weights.blob")]
    deleted = 0
    for name in names:
        for leftover in Path(cache_dir()).glob(f"*/{name}"):
            deleted += leftover.stat().st_size
            leftover.unlink()
    return deleted


def _flat(args: tuple) -> list[torch.Tensor]:
    """A step's arguments ``(ids, pos, mask, caches)`` as its container takes them: the exported signature,
    flattened."""
    *leading, caches = args
    return [*leading, *caches]


def _really_unused(directory: Path, names: list[str], example: tuple) -> bool:
    """Whether the span computes bit for bit the same with the pages of ``names`` given back (zeros)."""
    span = CompiledSpan(directory, unused=[])
    with torch.no_grad():
        before = span.container.run(_flat(example))[0].clone()
        release_constants(span.constants, names)
        return torch.equal(span.container.run(_flat(example))[0], before)


# A build holds, beside the loaded model, inductor's copies of the INT8 weights it compiles: freezing's folded
# constants, oneDNN's prepacked ones and its compensation sums, its GEMM template's packed copies, and the
# serialization of them all. A 1.1B Llama's decode build peaked 3.2 times its 1.2 GB of weights above the
# loaded model (AMX). So a larger model's steps are compiled a span of layers at a time, each span with about
# ``SPAN_BYTES`` of weights at most: a 7B model's in nine spans (its whole step would need about 28 GB). A span
# is also what loading holds twice for a moment: a step's span is copied whole into its container before the
# constants it shares with the other step's are given back.
BUILD_MEMORY_FACTOR = 4
BUILD_MEMORY_SPARE = 1 << 30
SPAN_BYTES = 768 << 20


def weight_bytes(net: torch.nn.Module) -> int:
    """Bytes of ``net``'s tensors, each counted once."""
    return sum({t.data_ptr(): t.nbytes for t in net.state_dict().values()}.values())


def layer_spans(net: torch.nn.Module) -> list[range]:
    """The compact model's blocks in as few spans as keep each within about ``SPAN_BYTES`` of weights."""
    count = min(len(net.blocks), max(1, -(-weight_bytes(net) // SPAN_BYTES)))
    ends = [round(i * len(net.blocks) / count) for i in range(count + 1)]
    return [range(first, last) for first, last in zip(ends, ends[1:])]


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_build_memory(net: torch.nn.Module) -> None:
    """Refuse to build what would not fit in memory (the kernel would kill the server, not an error)."""
    needed, available = BUILD_MEMORY_FACTOR * weight_bytes(net) + BUILD_MEMORY_SPARE, available_memory()
    if available is not None and available < needed:
        raise MemoryError(
            f"building it needs about {needed / 1e9:.1f} GB more memory, {available / 1e9:.1f} GB is available"
        )


def forget_traces() -> None:
    """Clear what torch keeps of the last export process-wide: export's map from fake tensors to the traced
    graph's nodes (whose graph holds the traced module, so the compact model's weights outlived the build: a
    first start served with more memory than a restart), and the shape environments that ``ShapeEnv``'s
    class-level method caches keep with their fake tensors."""
    from torch.fx.experimental import proxy_tensor, symbolic_shapes

    proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()
    for method in vars(symbolic_shapes.ShapeEnv).values():
        if hasattr(method, "cache_clear"):
            method.cache_clear()


def _build_span(net: torch.nn.Module, step: str, directory: Path, kv_dtype: torch.dtype, slots: int) -> None:
    """Compile ``step`` of the compact model (or ``layer_span``) ``net`` into ``directory``."""
    _check_build_memory(net)
    example, dynamic = _example(net, step, kv_dtype, slots)
    program = export_step(net, example, dynamic)
    stored = any(getattr(m, "stored_rows", False) for m in net.modules())
    kernel = net.kernel or kernels.eager_kernel()
    unused, gemms = compile_program(
        program, directory, few_rows=step != "prefill", stored_rows=stored, onednn=onednn_gemms(kernel)
    )
    del program
    forget_traces()
    heap.release_garbage()  # inductor's copies of the weights, before a container loads the step's own
    (directory / KERNELS).write_text(json.dumps({"w8a8": kernel, "gemms": gemms}))
    if unused and not _really_unused(directory, unused, example):
        log.warning("the %s step reads constants its wrapper seems not to use; keeping them all", step)
        unused = []
    (directory / UNUSED).write_text(json.dumps(unused))


def build(net: torch.nn.Module, step: str, path: Path, kv_dtype: torch.dtype, slots: int = 1) -> None:
    """Compile ``step``, for KV caches of ``kv_dtype`` (of ``slots`` sequences for ``batch``), into the
    directory ``path`` (written whole or not at all): one library per span of layers (``layer_spans``)."""
    spans = layer_spans(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".building-") as scratch:
        built = Path(scratch) / path.name
        built.mkdir()
        for index, layers in enumerate(spans):
            if len(spans) > 1:
                log.info("compiling layers %d-%d of %d", layers.start, layers.stop - 1, len(net.blocks))
            span = net if len(spans) == 1 else compact.layer_span(net, layers)
            _build_span(span, step, built / str(index), kv_dtype, slots)
        (built / SPANS).write_text(json.dumps([[layers.start, layers.stop] for layers in spans]))
        (built / SOURCE).write_text(source_digest())
        shutil.rmtree(path, ignore_errors=True)  # one that would not load
        os.replace(built, path)


class CompiledSpan:
    """A span of a step's layers loaded from its directory. The pages of its ``unused`` constants (by default
    those its build found unused) are given back."""

    def __init__(self, path: Path, unused: list[str] | None = None) -> None:
        torch.cpu._init_amx()  # the kernels may use AMX tiles, which Linux grants a process on request
        self.container = Container(path / LIBRARY, path / CONSTANTS)
        self.constants = self.container.constants()  # as loaded: what sharing compares
        self.unused = set(json.loads((path / UNUSED).read_text()) if unused is None else unused)
        self.released = release_constants(self.constants, self.unused)
        self.kernels = json.loads((path / KERNELS).read_text())


class CompiledStep:
    """A step loaded from its directory, called as the compact model is, KV caches included: its spans one
    after another, each on its own layers' caches. Each span's constants are shared with ``shared`` as it
    loads, so a large model's step never holds a second copy of them all."""

    def __init__(self, path: Path, shared: SharedConstants | None = None) -> None:
        spans = json.loads((path / SPANS).read_text())
        self.spans = []
        for index in range(len(spans)):
            self.spans.append(CompiledSpan(path / str(index)))
            if shared is not None:
                shared.add(self.spans[-1])
        self._caches = [slice(2 * first, 2 * last) for first, last in spans]
        self.kernel: str = self.spans[0].kernels["w8a8"]  # quant.kernels' W8A8 kernel
        # what its GEMMs run, by kind (step_kernels)
        self.gemms: dict[str, int] = dict(sum((Counter(span.kernels["gemms"]) for span in self.spans), Counter()))
        self.released = sum(span.released for span in self.spans)

    def __call__(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, caches: list[torch.Tensor]
    ) -> torch.Tensor:
        x = ids
        for span, layers in zip(self.spans, self._caches, strict=True):
            x = span.container.run([x, pos, mask, *caches[layers]])[0]
        return x


def load(path: Path, shared: SharedConstants | None = None) -> CompiledStep:
    """The step in ``path``, its constants shared with ``shared``; its source stamp's time says when it was
    last loaded (see ``prune_stale``)."""
    if not all((path / name).is_file() for name in (SOURCE, SPANS)):
        raise FileNotFoundError(f"{path}: no compiled step")
    with contextlib.suppress(OSError):  # a read-only cache still loads
        (path / SOURCE).touch()
    return CompiledStep(path, shared)
