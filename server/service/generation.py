"""A request, validated and tokenized, as the service runs it: its prompt, sampling, choices and what each
choice is held to (a grammar) and reports (log probabilities, tool calls)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from prompts.tools import ToolFormat
from server.engine.engine import GenerationStats
from server.engine.sampling import SamplingParams
from server.service.protocol import PromptTokensDetails, Usage, now
from server.service.scheduling import GenerationQueue


@dataclass(frozen=True)
class ToolCalling:
    """The answer may hold calls of these functions, written in ``format``."""

    format: ToolFormat
    names: frozenset[str]


@dataclass
class Generation:
    """Admitted to the queue, which it must run or ``abandon``. ``choices`` run one after another on one
    prefill (the prompt stays in the KV cache); each has its own seed and statistics."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    queue: GenerationQueue
    choices: int = 1
    grammar: str | None = None  # the tokens must follow it (engine.grammar)
    logprobs: int | None = None  # each token's log probability and that of the N most likely; None: not asked
    tools: ToolCalling | None = None
    stats: list[GenerationStats] = field(default_factory=list)
    created: int = field(default_factory=now)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to first token, once there is one
    finish_reason: str | None = None
    started: bool = False

    def params_of(self, choice: int) -> SamplingParams:
        """Choice ``choice``'s sampling: a seeded request seeds each choice on its own (seed + choice)."""
        if self.params.seed is None or choice == 0:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + choice)

    def abandon(self) -> None:
        """Give back the admission of a generation whose response never ran (safe to call always)."""
        if not self.started:
            self.started = True
            self.queue.admitted -= 1

    def usage(self) -> Usage:
        prompt = self.stats[0].prompt_tokens if self.stats else len(self.prompt_ids)
        cached = self.stats[0].cached_tokens if self.stats else 0
        completion = sum(s.completion_tokens for s in self.stats)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
