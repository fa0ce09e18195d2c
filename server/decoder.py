"""Decoders: run new tokens through the model on top of the cached ones and return the last logits.

The engine owns the token bookkeeping (which tokens the cache holds); a decoder owns the cache itself.
``StaticDecoder`` is the fast path for the Llama family: a compact model with a preallocated cache, its
prefill and one-token decode steps compiled ahead of time (``compiled_step``: frozen INT8 weights
prepacked for oneDNN, GEMMs from inductor's CPU templates: VNNI here, AMX where the CPU has it).
``HFDecoder`` runs the Hugging Face model eagerly and serves every other family.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from server import compiled_step
from server.step_constants import share_constants
from server.static_llama import StaticLlama, UnsupportedForCompile, attention_mask, check_supported, new_kv_caches

log = logging.getLogger(__name__)


class HFDecoder:
    def __init__(self, model) -> None:
        self.model = model
        self._cache = None
        self.description = "eager (Hugging Face modeling, dynamic KV cache)"

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits after ``ids``, placed at positions ``start...``; the cache beyond ``start`` is dropped."""
        if start == 0 or self._cache is None:
            from transformers import DynamicCache  # only here: it imports transformers' modeling code
            self._cache = DynamicCache()
        elif start < self._cache.get_seq_length():
            self._cache.crop(start - self._cache.get_seq_length())  # negative: drop from the end
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self._cache, use_cache=True)
        return out.logits[0, -1]

    def reset(self) -> None:
        self._cache = None


class StaticDecoder:
    """The compact model. Prompts run the ``prefill`` step and single tokens the ``decode`` step: compiled
    where ``steps`` has them, else ``net``, the module itself, eagerly (None when both are compiled)."""

    def __init__(self, max_len: int, caches: list[torch.Tensor], steps: dict | None = None,
                 net: StaticLlama | None = None) -> None:
        self.max_len, self.caches = max_len, caches
        self._steps, self._net = steps or {}, net
        compiled = " and ".join(f"{name} step" for name in self._steps)
        self.description = (f"compiled {compiled} (AOTInductor, frozen INT8 weights), static KV cache"
                            if compiled else "eager compact model, static KV cache")

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits after ``ids`` at positions ``start...``."""
        step = self._steps.get("decode" if len(ids) == 1 else "prefill")
        mask = attention_mask(self.max_len, start, len(ids), compiled=step is not None)
        return (step or self._net)(torch.tensor([ids]), torch.arange(start, start + len(ids)), mask, self.caches)[0]

    def reset(self) -> None:
        pass  # positions are overwritten before they are attended to: nothing to forget


def _first_line(exc: Exception) -> str:
    """Compiler errors run to pages; the log gets their first line."""
    return str(exc).splitlines()[0] if str(exc) else ""


def _compiled_step(compact: Callable[[], StaticLlama], step: str, package: Path):
    """The package's step, built first from the compact model if it is not there (or cannot be loaded).
    A build that failed is not tried again at every start: ``{package}.failed`` says why."""
    failed = package.with_name(package.name + ".failed")
    if failed.exists():
        raise RuntimeError(f"it failed to compile before ({failed.read_text().strip()}); delete {failed} to retry")
    if package.exists():
        try:
            loaded = compiled_step.load(package)
            log.info("loaded the compiled %s step %s", step, package)
            return loaded
        except Exception as exc:  # a package from a crashed build or another torch: build it again
            log.warning("cannot load %s (%s); compiling again", package, _first_line(exc))
    net = compact()
    log.info("compiling the %s step into %s (a minute or more on few cores; once per model and machine)...",
             step, package)
    begin = time.perf_counter()
    try:
        compiled_step.build(net, step, package)
    except Exception as exc:
        package.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{type(exc).__name__}: {_first_line(exc)}\n")
        raise
    log.info("%s step compiled in %.1f s", step, time.perf_counter() - begin)
    return compiled_step.load(package)


def make_decoder(load_model: Callable[[], nn.Module], config, max_len: int,
                 packages: dict[str, Path] | None = None):
    """The fastest decoder for a model of this ``config``. ``load_model`` gives the eager INT8 model and is
    called only when something needs its weights: a step to compile or to run eagerly, or a family the
    compact model does not cover. So a restart with both steps compiled never reads the checkpoint's
    weights. ``packages``: the compiled steps' directories by step name (see
    ``compiled_step.package_paths``), built when absent; None decodes eagerly."""
    try:
        check_supported(config)
    except UnsupportedForCompile as exc:
        log.info("%s; decoding eagerly with the Hugging Face model", exc)
        return HFDecoder(load_model())
    compact = functools.cache(lambda: StaticLlama(load_model(), max_len).eval())
    caches = new_kv_caches(config, max_len)
    steps = {}
    for step, package in (packages or {}).items():
        try:
            steps[step] = _compiled_step(compact, step, package)
            with torch.no_grad():  # one call, so that a broken package fails here and not on a request
                StaticDecoder(max_len, caches, {step: steps[step]}).forward([0] * (1 if step == "decode" else 2), 0)
        except Exception as exc:  # no C++ compiler, an inductor bug: serve, slower, and say why
            steps.pop(step, None)
            log.warning("cannot compile the %s step (%s: %s); running it eagerly", step,
                        type(exc).__name__, _first_line(exc))
    if packages:
        removed, freed = compiled_step.prune_stale(next(iter(packages.values())).parent)
        if removed:
            log.info("removed %d compiled steps built by other q8chat code, unused for a day (%.1f MB)",
                     removed, freed / 1e6)
    if steps:
        shared, released = share_constants(steps.values())
        unused = sum(step.released for step in steps.values())
        log.info("the compiled steps share %.1f MB of constants; %.1f MB of memory given back (%.1f MB of "
                 "copies, %.1f MB of constants no kernel reads)", shared / 1e6, (released + unused) / 1e6,
                 released / 1e6, unused / 1e6)
    return StaticDecoder(max_len, caches, steps, None if set(steps) == set(compiled_step.STEPS) else compact())
