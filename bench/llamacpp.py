"""llama.cpp as a benchmark competitor, through ``llama-cpp-python``'s C API (an optional extra: it
builds from source for about 10 minutes on 2 cores, so it is never a test or serving dependency).

It runs the same weights as q8chat, the source GGUF requantized to Q8_0 by llama.cpp's own quantizer,
and is driven by the same engine loop as every other variant through a decoder adapter, so
tokenization, sampling and timing are identical; only the forward pass differs.

On a CPU that advertises AMX, ggml's extra buffer types are switched off (``use_extra_bufts``): on a VM
that advertises AMX, its tile set-up faults (a general-protection fault at ``ldtilecfg`` in the first
decode), and for Q8_0 on x86 that buffer type is the only extra one, so what runs is llama.cpp's
AVX-512/VNNI Q8_0 path. Elsewhere llama.cpp runs as it is built for the CPU (llama-cpp-python builds it
with ``GGML_NATIVE``), extra buffer types included.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from quant.kernels import cpu_flags

log = logging.getLogger(__name__)

VARIANT = "llama.cpp-q8_0"
INSTALL_HINT = "pip install 'llama-cpp-python==0.3.36' (or: pip install -e '.[llamacpp]'); it builds from source"


class LlamaCppUnavailable(RuntimeError):
    pass


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class _Library:
    """The imported binding, with llama.cpp's C-side log silenced. The log hook is process-wide and
    llama.cpp calls it from any later call, so there is one instance per process (``_library``)."""

    def __init__(self) -> None:
        if not available():
            raise LlamaCppUnavailable(f"the {VARIANT} variant needs llama-cpp-python: {INSTALL_HINT}")
        import llama_cpp

        self.api = llama_cpp
        self._log_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


@functools.cache
def _library() -> _Library:
    return _Library()


def q8_0_gguf(source: Path, cache_dir: Path, threads: int, converter: Path | None = None) -> Path:
    """The source model as a Q8_0 GGUF made by llama.cpp's own tools, cached next to q8chat's INT8
    checkpoints: a GGUF source is requantized by its quantizer; a Hugging Face directory is converted by
    its ``convert_hf_to_gguf.py`` (``converter``: in the llama-cpp-python source, vendor/llama.cpp)."""
    api = _library().api
    out = Path(cache_dir).expanduser() / "llama.cpp" / f"{source.stem if source.is_file() else source.name}.Q8_0.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    if source.suffix == ".gguf":
        _requantize(api, source, partial, threads)
    elif source.is_dir() and converter is not None:
        _convert(converter, source, partial)
    else:
        raise LlamaCppUnavailable(
            f"{source}: the {VARIANT} variant needs a GGUF model, or for a Hugging Face "
            "directory, llama.cpp's convert_hf_to_gguf.py (--llama-cpp-converter)"
        )
    partial.rename(out)
    return out


def _requantize(api, source: Path, out: Path, threads: int) -> None:
    params = api.llama_model_quantize_default_params()
    params.ftype = api.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the shipped default model is Q4_1
    params.nthread = threads
    log.info("requantizing %s to Q8_0 with llama.cpp", source)
    if api.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        out.unlink(missing_ok=True)
        raise LlamaCppUnavailable(f"llama.cpp could not quantize {source} to Q8_0")


def _convert(converter: Path, source: Path, out: Path) -> None:
    """Run the converter with the gguf-py package that ships beside it (newer than PyPI's, as it expects)."""
    log.info("converting %s to Q8_0 GGUF with %s", source, converter)
    paths = [str(converter.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    done = subprocess.run(
        [sys.executable, str(converter), str(source), "--outtype", "q8_0", "--outfile", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppUnavailable(f"{converter} failed on {source}: {last}")


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a GGUF file (what decoding reads), without metadata and vocabulary."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


class LlamaCppDecoder:
    """The engine's decoder interface over a llama.cpp context: logits after ``ids`` at ``start...`` of a
    slot. Each slot is a llama.cpp sequence of its own, and ``decode`` puts one token of each of several
    in one ``llama_decode`` batch, as llama.cpp's server does with its parallel slots."""

    def __init__(self, path: Path, context: int, threads: int, slots: int = 1) -> None:
        api = self.api = _library().api
        self.slots = slots
        model_params = api.llama_model_default_params()
        amx = "amx_int8" in cpu_flags()
        model_params.use_extra_bufts = not amx  # see the module docstring
        self._model = api.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise LlamaCppUnavailable(f"llama.cpp could not load {path}")
        ctx_params = api.llama_context_default_params()
        ctx_params.n_ctx = context * slots  # split evenly between the sequences
        ctx_params.n_batch = ctx_params.n_ubatch = context
        ctx_params.n_seq_max = slots
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self._ctx = api.llama_init_from_model(self._model, ctx_params)
        self._batch = api.llama_batch_init(context, 0, 1)
        self._vocab = api.llama_vocab_n_tokens(api.llama_model_get_vocab(self._model))
        self.description = (
            f"llama.cpp {api.__version__} ({path.name}, {threads} threads{', no AMX buffers' if amx else ''}"
            + (f", {slots} sequences" if slots > 1 else "")
            + ")"
        )

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Decode ``(token, position, sequence, wants logits)`` entries in one batch: the logits asked for."""
        api, batch = self.api, self._batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0] = sequence
            batch.logits[i] = logits
        if (status := api.llama_decode(self._ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        rows = [i for i, entry in enumerate(entries) if entry[3]]
        out = [np.ctypeslib.as_array(api.llama_get_logits_ith(self._ctx, i), shape=(self._vocab,)) for i in rows]
        return torch.from_numpy(np.stack(out))

    def _drop(self, slot: int, start: int) -> None:
        self.api.llama_memory_seq_rm(self.api.llama_get_memory(self._ctx), slot, start, -1)

    def forward(self, ids: list[int], start: int, slot: int = 0) -> torch.Tensor:
        self._drop(slot, start)  # drop the cache from start on
        return self._run([(token, start + i, slot, i == len(ids) - 1) for i, token in enumerate(ids)])[0]

    def decode(self, tokens: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        for start, slot in zip(starts, slots, strict=True):
            self._drop(slot, start)
        return self._run([(t, start, slot, True) for t, start, slot in zip(tokens, starts, slots, strict=True)])

    def reset(self, slot: int = 0) -> None:
        self._drop(slot, 0)

    def __del__(self) -> None:
        if getattr(self, "_ctx", None):
            self.api.llama_batch_free(self._batch)
            self.api.llama_free(self._ctx)
            self.api.llama_model_free(self._model)
