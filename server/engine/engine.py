"""Tokens in, tokens out: prefill with KV-cache prefix reuse, decode steps, sampling, stop strings and
UTF-8-safe detokenization, for sequences that each hold one of the decoder's slots. No web imports.

Each slot's cache keeps the last generation that ran on it (inside the decoder, see ``decoder.Decoder``): a
chat client resends the whole history, so its next prompt usually starts with the tokens already in a
slot's cache, and only the rest is prefilled. Which sequences run together is ``batching``'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from server.engine.decoder import Decoder
from server.engine.grammar import Matcher
from server.engine.prefix_cache import PrefixCache, common_prefix_length
from server.engine.resync import resync
from server.engine.sampling import (
    SamplingParams,
    TokenLogprobs,
    choose,
    greedy_shortcut,
    new_generator,
    processed_logits,
    token_logprobs,
)
from server.engine.textstream import IncrementalDetokenizer, StopStrings

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


class Sequence:
    """One generation between steps: the tokens it must run next (``pending``: the rest of its prompt, then
    each sampled token) from ``position`` of its slot's cache, and what sampling a token needs."""

    def __init__(
        self,
        engine: Engine,
        slot: int,
        prompt_ids: list[int],
        reused: int,
        params: SamplingParams,
        stats: GenerationStats,
        matcher: Matcher | None,
        logprobs: int | None,
    ) -> None:
        self.slot, self.prompt_ids, self.params, self.stats = slot, prompt_ids, params, stats
        self.matcher, self.logprobs = matcher, logprobs
        self.pending, self.position = prompt_ids[reused:], reused
        self.budget = min(params.max_tokens, engine.context_length - len(prompt_ids))
        self.eos_token_ids = engine.eos_token_ids
        self.generated: list[int] = []
        self.generator = new_generator(params.seed)
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopStrings(params.stop)

    @property
    def prefilling(self) -> bool:
        """Whether prompt tokens other than the last are still to run (the last runs as a decode step)."""
        return len(self.pending) > 1

    def ran(self, count: int) -> None:
        self.pending, self.position = self.pending[count:], self.position + count

    def take(self, logits: torch.Tensor) -> StepOutput:
        """Sample the next token from the logits after ``pending``'s last; it becomes ``pending`` unless the
        generation ends here (a ``finish_reason``)."""
        params, matcher = self.params, self.matcher
        token, scored = None, None
        if matcher is None and self.logprobs is None:
            token = greedy_shortcut(logits, params, self.generated)
        if token is None:
            allowed = matcher and matcher.allowed()
            processed = processed_logits(logits, params, self.prompt_ids, self.generated, allowed)
            token = choose(processed, params, self.generator)
            scored = token_logprobs(processed, token, self.logprobs) if self.logprobs is not None else None
        self.generated.append(token)
        self.stats.completion_tokens = len(self.generated)
        self.pending = [token]
        if matcher is not None:
            matcher.advance(token)
        if token in self.eos_token_ids and (not params.ignore_eos or matcher is not None):
            return StepOutput(self.stops.flush(), "stop", scored)
        text, stopped = self.stops.feed(self.detokenizer.push(token))
        if stopped or (matcher is not None and matcher.finished):  # a complete grammar ends the text
            return StepOutput(text + ("" if stopped else self.stops.flush()), "stop", scored)
        if len(self.generated) >= self.budget:
            return StepOutput(text + self.stops.flush(), "length", scored)
        return StepOutput(text, logprobs=scored)


class Engine:
    """Runs sequences on the decoder's slots: ``begin`` one on a slot, ``prefill`` its prompt (in chunks, if
    asked), ``decode`` a token of several at once. ``generate`` runs one sequence on slot 0 to its end."""

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
        self.prefix_cache = prefix_cache  # past conversations' caches; None: only the live ones
        self.slots = decoder.slots
        self._cached: list[list[int]] = [[] for _ in range(self.slots)]  # the tokens each slot's cache holds
        self._used = [0] * self.slots  # when each slot last began a sequence (a counter)
        self._position_bytes = 0.0  # a cached position's keys and values, learnt from the first copy

    def reset(self, slot: int = 0) -> None:
        """Forget the slot's cached conversation (its next prompt is computed from scratch)."""
        self._cached[slot] = []
        self.decoder.reset(slot)

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

    def pick_slot(self, prompt_ids: list[int], free: list[int]) -> int:
        """Of the ``free`` slots, the one whose cache shares the longest prefix with the prompt (of those
        sharing as much, the least recently used)."""
        return max(free, key=lambda slot: (common_prefix_length(self._cached[slot], prompt_ids), -self._used[slot]))

    def begin(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stats: GenerationStats | None = None,
        slot: int = 0,
        matcher: Matcher | None = None,
        logprobs: int | None = None,
    ) -> Sequence:
        """A sequence on ``slot``, its prompt reused from the slot's cache (or a kept conversation) as far as
        it goes but for the last token, which always runs as a decode step: a repeated request then computes
        exactly what its first run computed, so greedy output is the same whether a request streams or not
        (a bulk forward sums in another order than one token). A resent answer that the tokenizer split
        otherwise than the model wrote it is read as the model wrote it (``resync``)."""
        if not prompt_ids:
            raise ValueError("an empty prompt")  # the service lets none through
        self.check_length(len(prompt_ids), None)
        stats = stats if stats is not None else GenerationStats()
        self._used[slot] = max(self._used) + 1
        live = common_prefix_length(self._cached[slot], prompt_ids)
        if self.prefix_cache is None:
            resent, held = resync(self._decode, self._cached[slot], prompt_ids, live)
        else:
            resent, held = self._switch_conversation(prompt_ids, live, slot)
        if len(resent) < self.context_length:
            prompt_ids, live = resent, held
        stats.prompt_tokens = len(prompt_ids)
        stats.cached_tokens = reused = min(live, len(prompt_ids) - 1)
        del self._cached[slot][reused:]  # the decoder overwrites or drops the cache from here on
        return Sequence(self, slot, prompt_ids, reused, params, stats, matcher, logprobs)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _switch_conversation(self, prompt_ids: list[int], live: int, slot: int) -> tuple[list[int], int]:
        """Keep the slot's conversation if the prompt leaves much of it behind, and bring back a kept one that
        the prompt continues further, counting the text it goes on with (``resync``): a client's tokens part
        from the model's at the first answer the tokenizer splits otherwise, and every later state of that
        conversation shares only that much. ``resync``'s prompt and held tokens for the slot's cache then."""
        resynced: dict[tuple[int, ...], tuple[list[int], int]] = {}  # each conversation's, computed once

        def reach(cached: tuple[int, ...], shared: int) -> int:
            resynced[cached] = resync(self._decode, list(cached), prompt_ids, shared)
            return resynced[cached][1]

        here = tuple(self._cached[slot])
        kept, _ = self.prefix_cache.longest(prompt_ids, reach(here, live), reach)
        if len(self._cached[slot]) - live >= KEEP_AFTER:
            self._keep(slot)
        if kept is None:
            return resynced[here]
        self.decoder.restore(kept.kv, len(kept.ids), slot)
        self._cached[slot] = list(kept.ids)
        return resynced[kept.ids]

    def keep_live(self) -> None:
        """Copy every slot's conversation to the prefix cache (if it has one) now: called while no sequence
        runs, it takes the copy off the clock of the next request, which would otherwise make it first."""
        if self.prefix_cache is None:
            return
        for slot, cached in enumerate(self._cached):
            if len(cached) >= KEEP_AFTER:
                self._keep(slot)

    def _keep(self, slot: int) -> None:
        """Copy the slot's conversation to the prefix cache, unless it holds it already or it would not fit the
        budget at all (a copy only to be dropped costs its bytes; a position's size is learnt at the first)."""
        ids = tuple(self._cached[slot])
        if self.prefix_cache.covers(ids) or len(ids) * self._position_bytes > self.prefix_cache.budget_bytes:
            return
        kv, nbytes = self.decoder.snapshot(len(ids), slot)
        self._position_bytes = nbytes / len(ids)
        self.prefix_cache.keep(ids, kv, nbytes)

    @torch.no_grad()
    def prefill(self, sequence: Sequence, limit: int | None = None) -> None:
        """Run the sequence's prompt but its last token, or the first ``limit`` tokens of it."""
        count = len(sequence.pending) - 1 if limit is None else min(limit, len(sequence.pending) - 1)
        ids = sequence.pending[:count]
        try:
            self.decoder.forward(ids, sequence.position, sequence.slot)
        except Exception:
            self.reset(sequence.slot)  # a half-updated cache must not be reused
            raise
        self._cached[sequence.slot].extend(ids)
        sequence.ran(count)

    @torch.no_grad()
    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Run each sequence's one pending token, all in one step: the logits of each (for its ``take``)."""
        tokens = [s.pending[0] for s in sequences]
        try:
            if len(sequences) == 1:
                logits = self.decoder.forward(tokens, sequences[0].position, sequences[0].slot)[None]
            else:
                logits = self.decoder.decode(tokens, [s.position for s in sequences], [s.slot for s in sequences])
        except Exception:
            for sequence in sequences:
                self.reset(sequence.slot)
            raise
        for sequence in sequences:
            self._cached[sequence.slot].extend(sequence.pending)
            sequence.ran(1)
        return logits

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stats: GenerationStats | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        matcher: Matcher | None = None,
        logprobs: int | None = None,
    ) -> Iterator[StepOutput]:
        """One sequence on slot 0, alone: yield one StepOutput per generated token; the last one carries
        ``finish_reason``. Stops early, yielding nothing more, once ``cancelled()`` is true. ``matcher``: a
        grammar the tokens must follow; the generation stops where it is complete. ``logprobs``: each
        token's log probability and that of the ``logprobs`` most likely ones."""
        sequence = self.begin(prompt_ids, params, stats, 0, matcher, logprobs)
        if sequence.prefilling:
            self.prefill(sequence)
        while not cancelled():
            out = sequence.take(self.decode([sequence])[0])
            yield out
            if out.finish_reason is not None:
                return
