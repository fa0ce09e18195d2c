"""Continuous batching: the generations of up to ``engine.slots`` requests run together, on one thread.

Each round runs one chunk of ``prefill_chunk`` prompt tokens (``next_chunk``) of the oldest request still
prefilling, then one decode step for every request that has a token to run, all in one batched step: the
weights are read once for all of them, which on a CPU (bound by memory bandwidth when decoding) makes the
extra sequences nearly free. A long prompt therefore delays the running streams by one chunk per token
at most. A prompt is prefilled in the same chunks when it runs alone, and a decode step computes the same
for a token whatever it runs with (``compact.ATTENTION_BLOCK``): so what a request gets does not
depend on the others.

A request's ``choices`` run one after another on its slot (the prompt stays in the slot's cache). A request
whose client went away (``cancelled``) leaves at the next round and frees its slot. When none runs, the
slots' conversations are copied to the prefix cache (``Engine.keep_live``) and the prompts' freed working
buffers go back to the OS (``heap.trim``), off any request's clock (why not after each prompt: ``heap``).

The batcher's thread is the only one of a serving process that computes (the model loads on a thread that
ends): libgomp spins at the steps' barriers only while it manages no more threads than there are CPUs, and
any other thread that ran a parallel region would keep a team of its own, making every barrier a sleep and a
wake (three times slower steps on 2 cores).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.engine import Engine, GenerationStats, Sequence
from server.engine.grammar import Matcher
from server.engine.sampling import SamplingParams
from server.runtime import heap

log = logging.getLogger(__name__)

DONE = object()  # the last item a job emits


def next_chunk(remaining: int, chunk: int) -> int:
    """How many of a prompt's ``remaining`` tokens its next chunk prefills: ``chunk``, or all of them where they
    exceed it by an eighth at most: a short last chunk would pay a whole step's fixed work (every weight read,
    the attended cache converted) for few tokens."""
    return remaining if remaining <= chunk + chunk // 8 else chunk


@dataclass
class Job:
    """A request as the batcher runs it. ``choice(k)`` gives choice ``k``'s sampling, statistics and grammar
    when it starts. ``emit`` receives, from the batcher's thread, ``(choice, StepOutput)`` for every token,
    then the exception if the generation failed, and ``DONE`` last."""

    prompt_ids: list[int]
    choice: Callable[[int], tuple[SamplingParams, GenerationStats, Matcher | None]]
    emit: Callable[[object], None]
    cancelled: Callable[[], bool] = lambda: False
    choices: int = 1
    logprobs: int | None = None


@dataclass
class _Running:
    job: Job
    slot: int
    index: int = 0  # the choice running
    sequence: Sequence | None = None


class Batcher:
    def __init__(self, engine: Engine, prefill_chunk: int) -> None:
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._running: list[_Running] = []  # oldest first
        self._thread = threading.Thread(target=self._loop, name="q8chat-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Run ``job`` as soon as a slot is free (the service admits no more than there are slots)."""
        self._inbox.put(job)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the thread once the running jobs are finished with, and wait for it (up to ``timeout`` s):
        whether it ended. A process must not exit while it computes: the interpreter's exit under a running
        torch operation aborts it ("terminate called without an active exception")."""
        self._inbox.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        closing = False
        while not closing or self._running:
            if not self._running and self._inbox.empty():
                self._idle()
            while not closing and len(self._running) < self.engine.slots:
                try:
                    job = self._inbox.get(block=not self._running)
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                else:
                    self._admit(job)
            self._round()

    def _idle(self) -> None:
        try:
            self.engine.keep_live()
        except Exception:  # losing a cached conversation costs a recomputation, not the batcher
            log.exception("cannot keep the finished conversations")
        heap.trim()

    def _admit(self, job: Job) -> None:
        taken = {running.slot for running in self._running}
        free = [slot for slot in range(self.engine.slots) if slot not in taken]
        running = _Running(job, self.engine.pick_slot(job.prompt_ids, free))
        self._running.append(running)
        self._begin(running, 0)

    def _begin(self, running: _Running, index: int) -> None:
        running.index = index
        try:
            params, stats, matcher = running.job.choice(index)
            running.sequence = self.engine.begin(
                running.job.prompt_ids, params, stats, running.slot, matcher, running.job.logprobs
            )
        except Exception as exc:
            self._finish(running, exc)

    def _round(self) -> None:
        for running in [r for r in self._running if r.job.cancelled()]:
            self._finish(running)
        if prefilling := [r for r in self._running if r.sequence.prefilling]:
            oldest = prefilling[0]
            try:
                self.engine.prefill(oldest.sequence, next_chunk(len(oldest.sequence.pending) - 1, self.prefill_chunk))
            except Exception as exc:
                self._finish(oldest, exc)
        ready = [r for r in self._running if not r.sequence.prefilling]
        if not ready:
            return
        try:
            rows = self.engine.decode([r.sequence for r in ready])
        except Exception as exc:
            for running in ready:
                self._finish(running, exc)
            return
        taken = []
        for running, row in zip(ready, rows, strict=True):
            try:
                taken.append((running, running.sequence.take(row)))
            except Exception as exc:
                taken.append((running, exc))
        # handed over together once all are sampled: the event loop wakes once a round to stream them all
        for running, out in taken:
            if isinstance(out, Exception):
                self._finish(running, out)
                continue
            self._emit(running, (running.index, out))
            if out.finish_reason is None:
                continue
            if running.index + 1 < running.job.choices:
                self._begin(running, running.index + 1)
            else:
                self._finish(running)

    def _finish(self, running: _Running, exc: Exception | None = None) -> None:
        if running in self._running:
            self._running.remove(running)
            if exc is not None:
                self._emit(running, exc)
            self._emit(running, DONE)

    @staticmethod
    def _emit(running: _Running, item: object) -> None:
        try:
            running.job.emit(item)
        except Exception:  # a receiver that is gone (its event loop closed) must not stop the others
            log.exception("cannot hand a generation's output over")
