"""Continuous batching on tiny random INT8 models: what each request gets does not depend on what it ran
with, long prompts are prefilled in chunks between the running streams' tokens, and slots are given back."""

import threading
import time

import pytest
import torch

from server.engine.batching import DONE, Batcher, Job, next_chunk
from server.engine.engine import Engine, GenerationStats, Sequence
from server.engine.prefix_cache import PrefixCache
from server.engine.sampling import SamplingParams
from server.runtime import heap
from server.runtime.decoders import make_decoder
from tests.harness import quantized_tiny


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, 2000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def make_engine(tiny_model, tokenizer):
    """An engine on the tiny INT8 model (Llama or MPT) with ``slots`` slots: the compact model's eager
    batched step."""
    quantized_tiny(tiny_model)

    def make(slots: int, kept_mb: float = 0.0) -> Engine:
        decoder = make_decoder(lambda: tiny_model, tiny_model.config, 256, slots=slots)
        assert decoder.slots == slots
        return Engine(decoder, tokenizer, 256, set(), PrefixCache(int(kept_mb * 2**20)) if kept_mb else None)

    return make


class Collected:
    """A job's emitted items, and when it is done."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.items, self.done = name, log, [], threading.Event()

    def emit(self, item) -> None:
        self.log.append(self.name)
        if item is DONE:
            self.done.set()
        else:
            self.items.append(item)

    def tokens(self, choice: int = 0) -> list[str]:
        return [step.text for index, step in self.items if index == choice]


def job(prompt, params, collected, stats=None, **kwargs) -> Job:
    return Job(prompt, lambda index: (params, stats or GenerationStats(), None), collected.emit, **kwargs)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def test_each_greedy_output_is_the_same_whatever_it_is_batched_with(make_engine):
    prompts = [random_ids(5, 1), random_ids(40, 2), random_ids(100, 3), random_ids(12, 4)]
    budgets = [6, 14, 9, 20]
    alone = [[s.text for s in make_engine(1).generate(p, greedy(n))] for p, n in zip(prompts, budgets, strict=True)]
    batcher = Batcher(make_engine(3), prefill_chunk=16)
    log: list = []
    collected = [Collected(i, log) for i in range(len(prompts))]
    for prompt, budget, c in zip(prompts, budgets, collected, strict=True):  # one waits for a free slot
        batcher.submit(job(prompt, greedy(budget), c))
    for c in collected:
        assert c.done.wait(60)
    batcher.close()
    assert [c.tokens() for c in collected] == alone
    assert len(set(log[: 3 * 6])) == 3  # the first three ran together


@torch.no_grad()
def test_a_batched_step_computes_each_tokens_logits_bit_for_bit_as_alone(make_engine):
    """Whoever it runs with, however far they reach: a short sequence batched with long ones (the attended
    width is the farthest's) gets exactly the logits it gets alone."""
    decoder = make_engine(3).decoder
    lengths = (60, 61, 90)
    for slot, length in enumerate(lengths):
        decoder.forward(random_ids(length, slot), 0, slot)
    kept = [decoder.snapshot(length, slot)[0] for slot, length in enumerate(lengths)]
    together = decoder.decode([7, 8, 9], list(lengths), [0, 1, 2])
    for slot, (length, token) in enumerate(zip(lengths, (7, 8, 9), strict=True)):
        decoder.restore(kept[slot], length, slot)
        assert torch.equal(decoder.forward([token], length, slot), together[slot])
    pair = decoder.decode([7, 9], [60, 90], [0, 2])  # an idle slot between them
    assert torch.equal(pair, together[[0, 2]])


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_tokens(make_engine):
    engine = make_engine(2)
    chunks: list[int] = []
    prefill = engine.prefill
    engine.prefill = lambda sequence, limit=None: (chunks.append(limit), prefill(sequence, limit))
    batcher = Batcher(engine, prefill_chunk=16)
    log: list = []
    running, newcomer = Collected("running", log), Collected("newcomer", log)
    batcher.submit(job(random_ids(4, 1), greedy(60), running))
    while not running.items:
        pass
    batcher.submit(job(random_ids(120, 2), greedy(3), newcomer))
    assert newcomer.done.wait(60) and running.done.wait(60)
    batcher.close()
    assert chunks[1:] == [16] * 7 + [7]  # 119 prompt tokens before the last: 8 chunks while the other decodes
    before_first = log[: log.index("newcomer")]
    assert before_first.count("running") >= 8  # a token of the running stream after every chunk


def test_a_prompt_s_last_chunk_takes_a_short_rest_with_it():
    assert [next_chunk(n, 512) for n in (100, 512, 531, 576, 577, 1100)] == [100, 512, 531, 576, 512, 512]


def test_a_rounds_tokens_are_handed_over_together_once_all_are_sampled(make_engine, monkeypatch):
    """So that the event loop wakes once a round to stream them all, not once for each."""
    log: list = []
    for cls, name in ((Engine, "decode"), (Sequence, "take")):
        original = getattr(cls, name)

        def logged(self, *args, _original=original, _name=name):
            log.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(cls, name, logged)
    batcher = Batcher(make_engine(2), prefill_chunk=16)
    collected = [Collected("emit", log), Collected("emit", log)]
    for index, c in enumerate(collected):
        batcher.submit(job(random_ids(6, index), greedy(5), c))
    assert all(c.done.wait(60) for c in collected)
    batcher.close()
    rounds = " ".join(log).split("decode")[1:]
    assert any(r.split() == ["take", "take", "emit", "emit"] for r in rounds)
    assert all("emit take" not in r for r in rounds)


def test_a_cancelled_request_frees_its_slot_at_the_next_step(make_engine):
    batcher = Batcher(make_engine(1), prefill_chunk=16)
    log: list = []
    leaving, next_one = Collected("leaving", log), Collected("next", log)
    batcher.submit(job(random_ids(8, 1), greedy(200), leaving, cancelled=lambda: len(leaving.items) >= 3))
    batcher.submit(job(random_ids(8, 2), greedy(4), next_one))
    assert leaving.done.wait(60) and next_one.done.wait(60)
    batcher.close()
    assert len(leaving.items) == 3 and len(next_one.tokens()) == 4


def test_choices_run_one_after_another_on_one_slot_the_prompt_reused(make_engine):
    batcher = Batcher(make_engine(2), prefill_chunk=16)
    stats = [GenerationStats(), GenerationStats()]
    collected = Collected("n", [])
    batcher.submit(Job(random_ids(30, 1), lambda index: (greedy(5), stats[index], None), collected.emit, choices=2))
    assert collected.done.wait(60)
    batcher.close()
    assert collected.tokens(0) == collected.tokens(1) and len(collected.tokens(1)) == 5
    assert [s.cached_tokens for s in stats] == [0, 29]


def test_users_taking_turns_each_keep_a_slot_of_their_own(make_engine):
    """Two users alternating 5-turn chats on two slots: from the second turn on, each prompt's whole previous
    turn comes from the cache (each conversation stays in the slot it began in)."""
    engine = make_engine(2)
    batcher = Batcher(engine, prefill_chunk=16)
    conversations = {"a": random_ids(30, 1), "b": random_ids(30, 2)}
    for turn in range(5):
        for user, history in conversations.items():
            stats, collected = GenerationStats(), Collected(user, [])
            batcher.submit(job(history, greedy(4), collected, stats))
            assert collected.done.wait(60)
            if turn:
                assert stats.cached_tokens == len(history) - 6
            history += random_ids(6, 10 * turn + len(user))  # the next question
    batcher.close()


def test_an_idle_batcher_keeps_the_conversations_so_that_no_request_waits_for_their_copy(make_engine):
    engine = make_engine(1, kept_mb=16)
    batcher = Batcher(engine, prefill_chunk=16)
    snapshot, copied_while_running = engine.decoder.snapshot, []

    def watched(length, slot=0):
        copied_while_running.append(bool(batcher._running))
        return snapshot(length, slot)

    engine.decoder.snapshot = watched
    a_first = random_ids(30, 1)
    for count, (prompt, cached) in enumerate(((a_first, 0), (random_ids(30, 2), 0), (a_first + random_ids(6, 3), 30))):
        stats, collected = GenerationStats(), Collected("", [])
        batcher.submit(job(prompt, greedy(4), collected, stats))
        assert collected.done.wait(60)
        assert stats.cached_tokens == cached  # A's third request: its conversation back from the kept copy
        deadline = time.monotonic() + 60  # the client's next request comes after the idle batcher's copy
        while len(copied_while_running) <= count and time.monotonic() < deadline:
            time.sleep(0.01)
    batcher.close()
    assert copied_while_running == [False] * 3  # each conversation once, when it was over


def test_the_heap_is_trimmed_while_the_batcher_is_idle_never_between_a_request_s_steps(make_engine, monkeypatch):
    """Trimming after a prompt made the next prompt fault its working buffers in again, on its clock."""
    engine = make_engine(2)
    batcher = Batcher(engine, prefill_chunk=16)
    trim, trims, requests = heap.trim, [], []

    def watched():
        trims.append((bool(batcher._running), sum(r.done.is_set() for r in requests)))  # (running, done)
        trim()

    monkeypatch.setattr(heap, "trim", watched)
    for seed in (1, 2):
        pair = [Collected("first", []), Collected("second", [])]
        requests += pair
        for index, collected in enumerate(pair):
            batcher.submit(job(random_ids(40, 10 * index + seed), greedy(6), collected))
        assert all(collected.done.wait(60) for collected in pair)
        deadline = time.monotonic() + 60  # the idle batcher trims once this pair is done
        while not any(done == len(requests) for _, done in trims) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(done == len(requests) for _, done in trims)
    batcher.close()
    assert not any(running for running, _ in trims)


def test_a_failing_step_fails_its_requests_and_the_batcher_keeps_serving(make_engine):
    engine = make_engine(2)
    decode, broken = engine.decode, threading.Event()
    broken.set()

    def flaky(sequences):
        if broken.is_set():
            broken.clear()
            raise RuntimeError("boom")
        return decode(sequences)

    engine.decode = flaky
    batcher = Batcher(engine, prefill_chunk=16)
    failed, fine = Collected("failed", []), Collected("fine", [])
    batcher.submit(job(random_ids(8, 1), greedy(4), failed))
    assert failed.done.wait(60)
    batcher.submit(job(random_ids(8, 1), greedy(4), fine))
    assert fine.done.wait(60)
    batcher.close()
    assert isinstance(failed.items[-1], RuntimeError) and len(fine.tokens()) == 4


def test_close_returns_once_the_thread_ended_even_while_it_keeps_a_conversation(make_engine):
    """A server exits after ``close``: an exit while the thread still copies a finished conversation (torch
    running) aborts the process."""
    engine = make_engine(1, kept_mb=16)
    snapshot, copying, copied = engine.decoder.snapshot, threading.Event(), []

    def slow(length, slot=0):
        copying.set()
        time.sleep(0.5)
        copied.append(length)
        return snapshot(length, slot)

    engine.decoder.snapshot = slow
    batcher = Batcher(engine, prefill_chunk=16)
    collected = Collected("", [])
    batcher.submit(job(random_ids(30, 1), greedy(4), collected))
    assert collected.done.wait(60) and copying.wait(60)
    assert batcher.close(timeout=60)
    assert not batcher._thread.is_alive() and copied == [33]
