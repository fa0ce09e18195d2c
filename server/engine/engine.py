"""Tokens in, tokens out, one generation at a time (batch size 1): prefill with KV-cache prefix reuse,
a decode loop, sampling, stop strings and UTF-8-safe detokenization. No web imports.

The KV cache of the previous generation is kept (inside the decoder, see ``decoder.Decoder``): a chat
client resends the whole history, so the next prompt usually starts with the tokens already in the
cache, and only the rest is prefilled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from server.engine.decoder import Decoder
from server.engine.grammar import Matcher
from server.engine.prefix_cache import PrefixCache, common_prefix_length
from server.engine.sampling import (
    SamplingParams,
    TokenLogprobs,
    choose,
    new_generator,
    processed_logits,
    token_logprobs,
)
from server.engine.textstream import IncrementalDetokenizer, StopStrings
from server.runtime import heap

log = logging.getLogger(__name__)


class ContextLengthExceeded(ValueError):
    pass


@dataclass
class StepOutput:
    """What one generated token releases: new text (possibly empty), the finish reason on the last, and the
    token's log probabilities when they were asked for."""

    text: str
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


KEEP_AFTER = 16  # a live conversation is kept when a prompt would overwrite this many of its tokens or more


class Engine:
    def __init__(
        self,
        decoder: Decoder,
        tokenizer,
        context_length: int,
        eos_token_ids: set[int],
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.prefix_cache = prefix_cache  # past conversations' caches; None: only the live one
        self._cache_ids: list[int] = []  # the tokens whose keys and values the decoder's cache holds

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is computed from scratch)."""
        self._cache_ids = []
        self.decoder.reset()

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> None:
        if prompt_tokens >= self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens; the prompt has "
                f"{prompt_tokens} tokens, leaving no room for a completion."
            )
        if max_tokens is not None and prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the prompt or max_tokens."
            )

    @torch.no_grad()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits = self.decoder.forward(ids, len(self._cache_ids))
        self._cache_ids.extend(ids)
        return logits

    def _prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, int]:
        """Logits after the prompt, and how many prompt tokens came from the cache.

        The last prompt token always goes through alone, like a decode step: a repeated request then
        reuses every other token and computes exactly what its first run computed, so greedy output is
        the same whether a request streams or not (a bulk forward sums in another order than M=1).
        """
        live = common_prefix_length(self._cache_ids, prompt_ids)
        if self.prefix_cache is not None:
            live = self._switch_conversation(prompt_ids, live)
        reused = min(live, len(prompt_ids) - 1)
        del self._cache_ids[reused:]  # the decoder overwrites or drops the cache from here on
        if len(prompt_ids) - 1 > reused:
            self._forward(prompt_ids[reused:-1])
            heap.trim()  # the prefill's working buffers: decoding needs none of them
        return self._forward(prompt_ids[-1:]), reused

    def _switch_conversation(self, prompt_ids: list[int], live: int) -> int:
        """Keep the live conversation if the prompt leaves much of it behind, and bring back a kept one that
        the prompt continues further; how many prompt tokens the cache then holds."""
        kept, length = self.prefix_cache.longest(prompt_ids, live)
        ids = tuple(self._cache_ids)
        if len(ids) - live >= KEEP_AFTER and not self.prefix_cache.covers(ids):
            self.prefix_cache.keep(ids, *self.decoder.snapshot(len(ids)))
        if kept is None:
            return live
        self.decoder.restore(kept.kv, length)
        self._cache_ids = list(kept.ids[:length])
        return length

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stats: GenerationStats | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        matcher: Matcher | None = None,
        logprobs: int | None = None,
    ) -> Iterator[StepOutput]:
        """Yield one StepOutput per generated token; the last one carries ``finish_reason``.
        Stops early, yielding nothing more, once ``cancelled()`` is true. ``matcher``: a grammar the tokens
        must follow; the generation stops where it is complete. ``logprobs``: each token's log probability
        and that of the ``logprobs`` most likely ones."""
        if not prompt_ids:
            raise ValueError("an empty prompt")  # the service lets none through
        stats = stats if stats is not None else GenerationStats()
        self.check_length(len(prompt_ids), None)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        stats.prompt_tokens = len(prompt_ids)
        try:
            logits, stats.cached_tokens = self._prefill(prompt_ids)
            generator = new_generator(params.seed)
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
            stops = StopStrings(params.stop)
            generated: list[int] = []
            while not cancelled():
                processed = processed_logits(logits, params, prompt_ids, generated, matcher and matcher.allowed())
                token = choose(processed, params, generator)
                scored = token_logprobs(processed, token, logprobs) if logprobs is not None else None
                generated.append(token)
                stats.completion_tokens = len(generated)
                if matcher is not None:
                    matcher.advance(token)
                if token in self.eos_token_ids and (not params.ignore_eos or matcher is not None):
                    yield StepOutput(stops.flush(), "stop", scored)
                    return
                text, stopped = stops.feed(detokenizer.push(token))
                if stopped or (matcher is not None and matcher.finished):  # a complete grammar ends the text
                    yield StepOutput(text + ("" if stopped else stops.flush()), "stop", scored)
                    return
                if len(generated) >= budget:
                    yield StepOutput(text + stops.flush(), "length", scored)
                    return
                yield StepOutput(text, logprobs=scored)
                logits = self._forward([token])
        except Exception:
            self.reset()  # a half-updated cache must not be reused
            raise
