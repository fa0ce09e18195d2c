"""Decoders: run new tokens through the model on top of the cached ones and return the last logits.

The engine owns the token bookkeeping (which tokens the cache holds); a decoder owns the cache itself.
``StaticDecoder`` is the fast path for the Llama and MPT families: a compact model with a preallocated cache, its
prefill and one-token decode steps compiled ahead of time (``compiled_step``: frozen INT8 weights
prepacked for oneDNN, GEMMs from inductor's CPU templates: VNNI here, AMX where the CPU has it).
``HFDecoder`` runs the Hugging Face model eagerly and serves every other family.

Both hold ``slots`` sequences' caches. The compact model decodes a token of each of them in one batched
step (``batch``, compiled too); the Hugging Face one runs them one after another.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quant.kernels import default_kernels, eager_kernels
from server.runtime.aoti import kernels as step_kernels
from server.runtime.aoti import steps as compiled_step
from server.runtime.aoti.constants import SharedConstants
from server.runtime.aoti.read_ahead import read_ahead
from server.runtime.compact import (
    DEFAULT_KV_DTYPE,
    UnsupportedForCompile,
    attention_mask,
    batch_mask,
    new_kv_caches,
    slot_views,
)
from server.runtime.static_llama import StaticLlama, check_llama
from server.runtime.static_mpt import StaticMPT, check_mpt

log = logging.getLogger(__name__)

# The compact model of each family that has one, with the check that a config's model is what it computes.
COMPACT_MODELS: dict[str, tuple[type[nn.Module], Callable]] = {
    "llama": (StaticLlama, check_llama),
    "mpt": (StaticMPT, check_mpt),
}


def compact_model_class(config) -> type[nn.Module]:
    """The compact model for this config's model; ``UnsupportedForCompile`` if none computes what it does."""
    if config.model_type not in COMPACT_MODELS:
        raise UnsupportedForCompile(f"no compact decoder for model type {config.model_type!r}")
    compact, check = COMPACT_MODELS[config.model_type]
    check(config)
    return compact


class HFDecoder:
    def __init__(self, model, slots: int = 1) -> None:
        self.model, self.slots = model, slots
        self._caches: list = [None] * slots
        self.description = "eager (Hugging Face modeling, dynamic KV cache" + (
            f", {slots} sequences decoded one after another)" if slots > 1 else ")"
        )

    def forward(self, ids: list[int], start: int, slot: int = 0) -> torch.Tensor:
        """Logits after ``ids``, placed at positions ``start...``; the cache beyond ``start`` is dropped."""
        cache = self._caches[slot]
        if start == 0 or cache is None:
            from transformers import DynamicCache  # only here: it imports transformers' modeling code

            cache = self._caches[slot] = DynamicCache()
        elif start < cache.get_seq_length():
            cache.crop(start - cache.get_seq_length())  # negative: drop from the end
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return out.logits[0, -1]

    def decode(self, tokens: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        return torch.stack(
            [self.forward([t], start, slot) for t, start, slot in zip(tokens, starts, slots, strict=True)]
        )

    def reset(self, slot: int = 0) -> None:
        self._caches[slot] = None

    def snapshot(self, length: int, slot: int = 0) -> tuple[object, int]:
        kept = copy.deepcopy(self._caches[slot])
        kept.crop(length - kept.get_seq_length())
        return kept, sum(layer.keys.nbytes + layer.values.nbytes for layer in kept.layers)

    def restore(self, kept, length: int, slot: int = 0) -> None:
        cache = self._caches[slot] = copy.deepcopy(kept)
        cache.crop(length - cache.get_seq_length())


class StaticDecoder:
    """The compact model. Prompts run the ``prefill`` step, single tokens the ``decode`` step and a token of
    each of several slots the ``batch`` step: compiled where ``steps`` has them, else the module of ``eager``
    for that step (by name) run eagerly."""

    def __init__(
        self,
        max_len: int,
        caches: list[torch.Tensor],
        steps: dict | None = None,
        eager: dict[str, nn.Module] | None = None,
    ) -> None:
        self.max_len, self.caches, self.slots = max_len, caches, caches[0].shape[0]
        self._slot_caches = [slot_views(caches, slot) for slot in range(self.slots)]
        steps, eager = steps or {}, eager or {}
        self._steps, self._compiled = {**eager, **steps}, set(steps)
        compiled = " and ".join(f"{name} step" for name in steps)
        kernels = [f"{net.kernel} eager {name}" for name, net in eager.items() if net.kernel]
        kernels += [f"{step.kernel} compiled {name}" for name, step in steps.items()]
        self.description = (
            (f"compiled {compiled} (AOTInductor, frozen INT8 weights)" if compiled else "eager compact model")
            + f", static {str(caches[0].dtype).removeprefix('torch.')} KV cache of "
            + f"{sum(cache.nbytes for cache in caches) / 1e6:.1f} MB"
            + (f" for {self.slots} sequences" if self.slots > 1 else "")
            + (f"; W8A8 kernel {', '.join(kernels)}" if kernels else "")
        )

    def forward(self, ids: list[int], start: int, slot: int = 0) -> torch.Tensor:
        """Logits after ``ids`` at positions ``start...`` of slot ``slot``."""
        name = "decode" if len(ids) == 1 else "prefill"
        mask = attention_mask(self.max_len, start, len(ids), compiled=name in self._compiled)
        tokens = torch.from_numpy(np.array([ids], dtype=np.int64))  # numpy: cheaper calls between steps
        pos = torch.from_numpy(np.arange(start, start + len(ids), dtype=np.int64))
        return self._steps[name](tokens, pos, mask, self._slot_caches[slot])[0]

    def decode(self, tokens: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Logits ``[len(tokens), vocab]`` after token ``tokens[i]`` at position ``starts[i]`` of slot
        ``slots[i]``, in one step over all slots (the idle ones compute a token that is discarded)."""
        at: list[int | None] = [None] * self.slots
        ids = np.zeros((self.slots, 1), dtype=np.int64)
        for token, start, slot in zip(tokens, starts, slots, strict=True):
            at[slot], ids[slot, 0] = start, token
        pos, mask = batch_mask(self.max_len, at)
        return self._steps["batch"](torch.from_numpy(ids), pos, mask, self.caches)[slots]

    def reset(self, slot: int = 0) -> None:
        pass  # positions are overwritten before they are attended to: nothing to forget

    def snapshot(self, length: int, slot: int = 0) -> tuple[object, int]:
        kept = [cache[:, :, :length].clone() for cache in self._slot_caches[slot]]
        return kept, sum(t.nbytes for t in kept)

    def restore(self, kept, length: int, slot: int = 0) -> None:
        for cache, saved in zip(self._slot_caches[slot], kept, strict=True):
            cache[:, :, :length].copy_(saved[:, :, :length])


def _first_line(exc: Exception) -> str:
    """Compiler errors run to pages; the log gets their first line."""
    return str(exc).splitlines()[0] if str(exc) else ""


# A step that cannot serve leaves a marker beside its directory, so that later starts do not build it again:
# ``failed`` (it did not compile, load or run) or ``slower`` (it ran slower than the eager step it replaces).
MARKERS = ("failed", "slower")


def _marker(package: Path, kind: str) -> Path:
    return package.with_name(f"{package.name}.{kind}")


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _mark(package: Path, kind: str, reason: str) -> None:
    package.parent.mkdir(parents=True, exist_ok=True)
    _marker(package, kind).write_text(reason + "\n")


def _checked(package: Path, run_once: Callable, shared: SharedConstants) -> compiled_step.CompiledStep:
    """The step in ``package`` (constants shared with ``shared``), run once, so that a broken one fails here and
    not on a request."""
    loaded = compiled_step.load(package, shared)
    run_once(loaded)
    return loaded


def _median_s(run: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def _inputs(step: str, max_len: int, caches: list[torch.Tensor], compiled: bool) -> tuple:
    """A step's arguments for timing it: a decode step at position 256 (or the cache's end), a batched one
    with every slot there, a prefill of 512 tokens (or what fits), each with the mask it is served with (a
    prefill from position 0 runs eagerly with none: causal attention skips the masked half)."""
    start = min(256, max_len - 2)
    if step == "batch":
        slots = caches[0].shape[0]
        return (torch.zeros(slots, 1, dtype=torch.long), *batch_mask(max_len, [start] * slots), caches)
    count, start = (1, start) if step == "decode" else (min(512, max_len - 1), 0)
    mask = attention_mask(max_len, start, count, compiled=compiled)
    return torch.zeros(1, count, dtype=torch.long), torch.arange(start, start + count), mask, slot_views(caches, 0)


def _timed_against_eager(compiled: Callable, eager: nn.Module, step: str, caches: list[torch.Tensor]) -> str:
    """Seconds per call of the compiled step and of the eager one it replaces, on the same input
    (``_inputs``). Raises if the compiled step is slower, with both figures."""
    runs = (("compiled", compiled, True), ("eager", eager, False), ("compiled again", compiled, True))
    reps = 3 if step == "prefill" else 15
    with torch.no_grad():
        figures = {
            name: _median_s(functools.partial(run, *_inputs(step, eager.max_len, caches, kind)), reps)
            for name, run, kind in runs
        }
    compiled_s, eager_s = min(figures["compiled"], figures["compiled again"]), figures["eager"]
    count = _inputs(step, eager.max_len, caches, True)[0].numel()
    summary = f"compiled {compiled_s * 1e3:.2f} ms, eager {eager_s * 1e3:.2f} ms per {count}-token call"
    if compiled_s > eager_s:
        raise RuntimeError(f"it ran slower than eager: {summary}")
    return summary


def _refuse_marked(package: Path) -> None:
    """Raise if a start before left a marker (``MARKERS``) for this package."""
    for kind in MARKERS:
        if (marker := _marker(package, kind)).exists():
            raise RuntimeError(
                f"{'it failed before' if kind == 'failed' else 'it ran slower than eager before'} "
                f"({marker.read_text().strip()}); delete {marker} to retry"
            )


def _build_step(compact: Callable[[], nn.Module], step: str, package: Path, caches: list[torch.Tensor]) -> None:
    """Compile ``step`` of the compact model into ``package``. A failure leaves the ``failed`` marker, except for
    too little memory, which is not the step's fault: a later start with more memory free builds it."""
    net = compact()
    log.info("compiling the %s step into %s (minutes on few cores; once per model and machine)...", step, package)
    begin = time.perf_counter()
    try:
        compiled_step.build(net, step, package, caches[0].dtype, caches[0].shape[0])
    except MemoryError:
        raise
    except Exception as exc:
        _mark(package, "failed", _reason(exc))
        raise
    log.info("%s step compiled in %.1f s", step, time.perf_counter() - begin)


def _loaded_step(
    compact: Callable[[], nn.Module],
    eager: Callable[[], nn.Module],
    step: str,
    package: Path,
    caches: list[torch.Tensor],
    max_len: int,
    shared: SharedConstants,
    fresh: bool,
):
    """The package's step, loaded and run once, its constants shared with those of the steps loaded before
    (``shared``); built again if it cannot be loaded. A ``fresh`` build is timed against the ``eager`` step;
    one that fails to load or run, or runs slower, leaves a marker (``MARKERS``) that later starts honour."""

    def one_call(loaded) -> None:
        decoder = StaticDecoder(max_len, caches, {step: loaded})
        with torch.no_grad():
            if step == "batch":
                decoder.decode([0] * decoder.slots, [0] * decoder.slots, list(range(decoder.slots)))
            else:
                decoder.forward([0] * (1 if step == "decode" else 2), 0)

    if not fresh:
        try:
            loaded = _checked(package, one_call, shared)
            log.info("loaded the compiled %s step %s (%s)", step, package, step_kernels.describe(loaded.gemms))
            return loaded
        except Exception as exc:  # a step from a crashed build or another torch: build it again
            log.warning("cannot load %s (%s); compiling again", package, _first_line(exc))
        _build_step(compact, step, package, caches)
    try:
        loaded = _checked(package, one_call, shared)
    except Exception as exc:
        _mark(package, "failed", _reason(exc))
        raise
    log.info("the compiled %s step's GEMMs: %s", step, step_kernels.describe(loaded.gemms))
    try:
        log.info("the %s step against eager: %s", step, _timed_against_eager(loaded, eager(), step, caches))
    except RuntimeError as exc:
        _mark(package, "slower", str(exc))
        raise
    return loaded


def _not_compiled(step: str, exc: Exception) -> None:
    log.warning("not using a compiled %s step (%s); running it eagerly", step, _reason(exc))


def make_decoder(
    load_model: Callable[[], nn.Module],
    config,
    max_len: int,
    packages: dict[str, Path] | None = None,
    kernels: dict[str, str] | None = None,
    kv_dtype: torch.dtype = DEFAULT_KV_DTYPE,
    slots: int = 1,
):
    """The fastest decoder for a model of this ``config``, with caches for ``slots`` sequences. ``load_model``
    gives the eager INT8 model and is called only when something needs its weights: a step to compile or to
    run eagerly, or a family the compact model does not cover. So a restart with every step compiled never
    reads the checkpoint's weights. ``packages``: the compiled steps' directories by step name (see
    ``compiled_step.package_paths``), built when absent; None decodes eagerly. ``kernels``: the W8A8
    kernel of each compiled step (``quant.kernels``; None: this CPU's); eager steps get this CPU's
    ``eager_kernels()``. ``kv_dtype``: the static KV cache's element type (``KV_DTYPES``), which the packages
    must have been keyed by, as by ``slots`` (more than one: a ``batch`` package)."""
    try:
        compact_class = compact_model_class(config)
    except UnsupportedForCompile as exc:
        log.info("%s; decoding eagerly with the Hugging Face model", exc)
        return HFDecoder(load_model(), slots)
    kernels = kernels or default_kernels()
    model = functools.cache(load_model)
    compact = functools.cache(lambda kernel: compact_class(model(), max_len, kernel).eval())
    by_step = eager_kernels()

    def eager(step: str) -> nn.Module:
        return compact(compiled_step.kernel_of(by_step, step))

    def to_compile(step: str) -> nn.Module:
        return compact(compiled_step.kernel_of(kernels, step))

    caches = new_kv_caches(config, max_len, kv_dtype, slots)
    # Every step is built before any is loaded: a build then holds the model and one span's copies, not also
    # the constants of the steps loaded before it.
    ready, fresh = [], set()
    for step, package in (packages or {}).items():
        try:
            _refuse_marked(package)
            if not package.exists():
                _build_step(functools.partial(to_compile, step), step, package, caches)
                fresh.add(step)
            ready.append(step)
        except Exception as exc:  # no C++ compiler, an inductor bug, too little memory: serve, and say why
            _not_compiled(step, exc)
    read_ahead([packages[step] for step in ready])
    steps, shared = {}, SharedConstants()
    for step in ready:
        try:
            steps[step] = _loaded_step(
                functools.partial(to_compile, step),
                functools.partial(eager, step),
                step,
                packages[step],
                caches,
                max_len,
                shared,
                step in fresh,
            )
        except Exception as exc:  # it does not load or run, or runs slower than eager
            _not_compiled(step, exc)
    if packages:
        removed, freed = compiled_step.prune_stale(next(iter(packages.values())).parent)
        if removed:
            log.info(
                "removed %d compiled steps built by other q8chat code, unused for a day (%.1f MB)", removed, freed / 1e6
            )
    if steps:
        unused = sum(step.released for step in steps.values())
        log.info(
            "the compiled steps share %.1f MB of constants; %.1f MB of memory given back (%.1f MB of "
            "copies, %.1f MB of constants no kernel reads)",
            shared.shared / 1e6,
            (shared.released + unused) / 1e6,
            shared.released / 1e6,
            unused / 1e6,
        )
    eager_steps = {step: eager(step) for step in compiled_step.steps_of(slots) if step not in steps}
    compact.cache_clear()  # the compiled steps' own copy of the model is no longer needed
    return StaticDecoder(max_len, caches, steps, eager_steps)
