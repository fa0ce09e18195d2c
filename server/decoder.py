"""Decoders: run new tokens through the model on top of the cached ones and return the last logits.

The engine owns the token bookkeeping (which tokens the cache holds); a decoder owns the cache itself.
``StaticDecoder`` is the fast path for the Llama family: a compact model with a preallocated cache and
the one-token decode step compiled by inductor (frozen INT8 weights prepacked for oneDNN, GEMMs from
inductor's CPU templates: VNNI here, AMX where the CPU has it). ``HFDecoder`` runs the Hugging Face
model eagerly and serves every other family.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import DynamicCache

from server.static_llama import StaticLlama, UnsupportedForCompile

log = logging.getLogger(__name__)



def configure_inductor() -> None:
    """Freezing turns weights into constants, which lets inductor prepack the INT8 ones for oneDNN;
    max-autotune picks between oneDNN and inductor's own GEMM templates (VNNI/AMX micro-kernels).
    Process-wide settings: freezing is not honoured as a per-compile option."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"


class HFDecoder:
    def __init__(self, model) -> None:
        self.model = model
        self._cache: DynamicCache | None = None
        self.description = "eager (Hugging Face modeling, dynamic KV cache)"

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits after ``ids``, placed at positions ``start...``; the cache beyond ``start`` is dropped."""
        if start == 0 or self._cache is None:
            self._cache = DynamicCache()
        elif start < self._cache.get_seq_length():
            self._cache.crop(start - self._cache.get_seq_length())  # negative: drop from the end
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self._cache, use_cache=True)
        return out.logits[0, -1]

    def reset(self) -> None:
        self._cache = None


class StaticDecoder:
    def __init__(self, model, max_len: int, compile: bool) -> None:
        self.net = StaticLlama(model, max_len).eval()
        self.compiled = compile
        if compile:
            configure_inductor()
        self._step = torch.compile(self.net, fullgraph=True) if compile else self.net
        self.description = ("compiled decode step (inductor, frozen INT8 weights), static KV cache" if compile
                            else "eager compact model, static KV cache")

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits after ``ids`` at positions ``start...``. Prompts run eagerly; single tokens after the
        first position run the compiled step, with the attended length symbolic so one graph serves
        every position (a length of 1 would be specialized by the compiler: position 0 runs eagerly)."""
        mask = self.net.attention_mask(start, len(ids))
        step = self.net
        if len(ids) == 1 and start > 0:
            step = self._step
            if self.compiled:
                torch._dynamo.mark_dynamic(mask, 1)
        return step(torch.tensor([ids]), torch.arange(start, start + len(ids)), mask)[0]

    def warm_up(self) -> float:
        """Compile now rather than on the first request; returns the seconds it took."""
        begin = time.perf_counter()
        with torch.no_grad():  # as the engine runs it: another mode would compile again
            for position in (1, 2):  # two lengths: the second call must hit the same graph
                self.forward([0], position)
        return time.perf_counter() - begin

    def reset(self) -> None:
        pass  # positions are overwritten before they are attended to: nothing to forget


def make_decoder(model, max_len: int, compile: bool):
    """The fastest decoder this model supports, warmed up."""
    try:
        decoder = StaticDecoder(model, max_len, compile)
    except UnsupportedForCompile as exc:
        log.info("%s; decoding eagerly with the Hugging Face model", exc)
        return HFDecoder(model)
    if compile:
        log.info("compiling the decode step (a minute or more on few cores)...")
        try:
            log.info("decode step compiled in %.1f s", decoder.warm_up())
        except Exception as exc:  # no C++ compiler, an inductor bug: serve, slower, and say why
            log.warning("cannot compile the decode step (%s: %s); decoding eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return StaticDecoder(model, max_len, compile=False)
    return decoder
