"""Many users at once, end to end: a real server on the default INT8 model with ``--max-batch 3`` and a
small prefill chunk streams several greedy answers together, each the answer its request gets alone, while
the router gauges show them running; a fourth request waits for a slot, and a client that leaves frees its
slot; two users taking turns each find their conversation in a slot of their own."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bench.chats import alternating_chats, cached_share
from bench.concurrency import concurrent_streams
from quant.checkpoint import read_checkpoint_info
from server.runtime.compact import kv_dtype_for
from tests.harness import tiny_checkpoint

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
PLACES = ["the sea", "the desert", "the mountains", "a forest", "the arctic", "a river", "a city", "a cave"]
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "List three uses of a paper clip, one per line.",
    "Explain why the sky is blue to a child, " * 12,  # a longer prompt: prefilled in chunks of 16
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def batched(start_server):
    return start_server("--max-batch", "3", "--prefill-chunk", "16", "--max-queue", "4")


def gauge(server, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def streamed_together(server, model: str, prompts: list[str], max_tokens: int):
    """``concurrent_streams``, and the most requests the server's gauge showed running meanwhile."""
    running, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            running.append(gauge(server, "vllm:num_requests_running"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return concurrent_streams(server.base_url, model, prompts, max_tokens), max(running)
    finally:
        stop.set()
        watcher.join()


def test_concurrent_greedy_streams_each_get_their_answer_alone(batched):
    alone = [concurrent_streams(batched.base_url, MODEL, [p], 24, first=i)[0].text for i, p in enumerate(PROMPTS)]
    together, running = streamed_together(batched, MODEL, PROMPTS, 24)
    assert [s.text for s in together] == alone
    assert all(s.tokens == 24 for s in together)
    assert running == 3  # three decoded together, the fourth waited for a slot
    assert gauge(batched, "vllm:num_requests_running") == 0


def test_a_client_that_leaves_frees_its_slot(batched):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand."}], "stream": True}
    for _ in range(3):  # every slot taken by a client that reads one chunk and goes away
        with httpx.stream("POST", batched.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
    deadline = time.monotonic() + 30
    while gauge(batched, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauge(batched, "vllm:num_requests_running") == 0
    answer = httpx.post(
        batched.base_url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4


def test_two_users_taking_turns_each_find_their_conversation_in_a_slot(batched):
    """From each user's second turn on, the whole history but the new question comes from the cache: the last
    prompt, and the answer to it but its last token (which was sampled, not run)."""
    questions = [f"Question {i}: name one animal that lives in {place}." for i, place in enumerate(PLACES)]
    usage = alternating_chats(batched.base_url, MODEL, "Answer in one short sentence.", questions, 4, 16)
    assert [len(turns) for turns in usage] == [4, 4]
    for turns in usage:
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later["cached_tokens"] >= earlier["prompt_tokens"] + earlier["completion_tokens"] - 1, usage
    shares = cached_share(usage)
    assert 0.5 < shares["min_cached_share"] <= shares["cached_share"] < 1
    assert 0.9 < shares["min_history_share"] <= shares["history_share"] <= 1


@pytest.mark.timeout(1800)  # compiles three steps of a tiny model
def test_a_compiled_batched_server_serves_on_the_cache_its_defaults_pick(start_server, tokenizer, tmp_path_factory):
    """``q8chat serve --max-batch 2`` as a user starts it (compiled steps, the default ``--kv-cache-dtype auto``)
    on a tiny model whose heads q8chat's kernels read in whole vectors: its slots' cache is the type the defaults
    pick on this CPU (INT8 with AVX-512 and no AMX), and streams decode together in the batch step to their end."""
    checkpoint = tiny_checkpoint(tokenizer, tmp_path_factory.mktemp("tiny-32") / "tiny", head_dim=32)
    cache = tmp_path_factory.mktemp("tiny-32-cache")
    server = start_server(
        "--model",
        str(checkpoint),
        "--context-length",
        "256",
        "--max-batch",
        "2",
        env={"Q8CHAT_COMPILE": "true", "Q8CHAT_CACHE_DIR": str(cache)},
    )
    log = server.log()
    assert "batch step compiled in" in log, log[-3000:]
    picked = kv_dtype_for("auto", read_checkpoint_info(checkpoint).config, 2, compiled=True)
    assert f"static {str(picked).removeprefix('torch.')} KV cache" in log
    together, running = streamed_together(server, "tiny", PROMPTS[:2] * 2, 24)
    assert [s.tokens for s in together] == [24] * 4 and running == 2
    assert gauge(server, "vllm:num_requests_running") == 0
