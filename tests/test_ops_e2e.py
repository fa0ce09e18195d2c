"""End to end, as an operator sees it: metrics, API keys, logs, graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Say hello."}]


def samples(base_url: str, headers=None) -> dict[tuple, float]:
    text = httpx.get(base_url + "/metrics", headers=headers).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def ops_server(start_server):
    return start_server("--max-queue", "4")


def test_metrics_count_requests_tokens_and_latencies_exactly(ops_server):
    url = ops_server.base_url
    before = samples(url)
    usages = []
    for i in range(3):
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "max_tokens": 5 + i, "ignore_eos": True},
            timeout=120,
        )
        usages.append(r.json()["usage"])
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=120,
        json={
            "model": MODEL,
            "messages": QUESTION,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(lines[-1][6:])["usage"])
    httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": QUESTION}, timeout=30)
    after = samples(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("q8chat_requests_total", endpoint="/v1/chat/completions", status="200") == 4
    assert delta("q8chat_requests_total", endpoint="/v1/chat/completions", status="404") == 1
    assert delta("q8chat_generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == 5 + 6 + 7 + 4
    assert delta("q8chat_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("q8chat_time_to_first_token_seconds_count") == 4
    assert delta("q8chat_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usages)
    assert value(after, "q8chat_model_load_seconds") > 0


def test_gauges_return_to_zero_after_cancelled_requests(ops_server):
    url = ops_server.base_url
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 300, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
    seen_busy = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = samples(url)
        running, waiting = value(m, "q8chat_running"), value(m, "q8chat_queue_waiting")
        if running == 0 and waiting == 0:
            break
        seen_busy = True
        time.sleep(0.2)
    assert (running, waiting) == (0, 0), f"still running={running} waiting={waiting} (busy seen: {seen_busy})"
    m = samples(url)  # the names a Gateway API inference extension router reads
    assert value(m, "vllm:num_requests_running") == value(m, "vllm:num_requests_waiting") == 0


def test_two_users_taking_turns_find_their_histories_in_the_cache(ops_server):
    """Each user's history comes back from the kept conversations, though the other user spoke in between:
    from the second turn on, at least the whole of the user's previous prompt comes from the cache (the
    previous answer too, as far as the template renders it as the model wrote it); without the kept
    conversations only the system prompt's first tokens would."""
    url = ops_server.base_url
    before = samples(url)
    style = "Answer in one or two short sentences, plainly, without lists, and never ask a question back."
    chats = {
        "ada": [
            {"role": "system", "content": f"You are the assistant of Ada, a mathematician who studies knots. {style}"}
        ],
        "bo": [{"role": "system", "content": f"You are the assistant of Bo, who keeps bees in the mountains. {style}"}],
    }
    previous: dict[str, int] = {}  # each user's last prompt length
    for turn in range(5):
        for user, messages in chats.items():
            messages.append({"role": "user", "content": f"Turn {turn}: tell me one short fact about {user}'s work."})
            body = {"model": MODEL, "messages": messages, "max_tokens": 32, "temperature": 0}
            answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
            messages.append(answer["choices"][0]["message"])
            usage = answer["usage"]
            if turn:
                assert usage["prompt_tokens_details"]["cached_tokens"] >= previous[user], (turn, user, usage)
            previous[user] = usage["prompt_tokens"]
    after = samples(url)
    assert value(after, "q8chat_prefix_cache_hits_total") - value(before, "q8chat_prefix_cache_hits_total") >= 8
    assert value(after, "q8chat_prefix_cache_bytes") > 0 and 0 < value(after, "vllm:kv_cache_usage_perc") <= 1


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server(
        "--api-key",
        "k1-secret-value",
        "--api-key",
        "k2-secret-value",
        "--log-format",
        "json",
        "--cors-origins",
        "http://chat.example",
    )


def test_api_keys(keyed_server):
    url = keyed_server.base_url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "k1-secret-valu"}):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(keyed_server.base_url + "/v1/models").status_code == 401
    assert (
        httpx.post(url, json=body, headers={"Authorization": "Bearer k1-secret-value"}, timeout=60).status_code == 200
    )
    assert httpx.post(url, json=body, headers={"X-Api-Key": "k2-secret-value"}, timeout=60).status_code == 200
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200  # open for health checks
    log = keyed_server.log()
    assert "secret-value" not in log


def test_cors_allows_only_the_configured_origins(keyed_server):
    url = keyed_server.base_url + "/v1/chat/completions"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(url, headers={"Origin": "http://chat.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://chat.example"
    other = httpx.options(url, headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_json_access_log_has_one_line_per_request(keyed_server):
    r = httpx.post(
        keyed_server.base_url + "/v1/chat/completions",
        headers={"X-Api-Key": "k1-secret-value"},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 3, "ignore_eos": True},
        timeout=60,
    )
    request_id = r.json()["id"]
    time.sleep(0.2)
    lines = [
        json.loads(line) for line in keyed_server.log().splitlines() if line.startswith("{") and request_id in line
    ]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["status"] == 200 and entry["completion_tokens"] == 3 and entry["ttft_s"] > 0
    assert entry["path"] == "/v1/chat/completions" and entry["duration_s"] > 0


def test_sigterm_finishes_the_running_generation_refuses_waiters_and_exits_zero(start_server):
    proc = start_server("--max-queue", "4", "--shutdown-grace-s", "60")
    url = proc.base_url + "/v1/chat/completions"
    results: dict[str, httpx.Response] = {}

    def call(name, tokens):
        results[name] = httpx.post(
            url, json={"model": MODEL, "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True}, timeout=120
        )

    # long enough to be still running at SIGTERM (1.5 s in): 60 tokens sometimes finished first, the
    # waiting request got its turn, and the test saw 200 instead of 503
    running = threading.Thread(target=call, args=("running", 300))
    running.start()
    time.sleep(1.0)
    waiting = threading.Thread(target=call, args=("waiting", 5))
    waiting.start()
    time.sleep(0.5)
    proc.process.send_signal(signal.SIGTERM)
    running.join(120)
    waiting.join(120)
    assert results["waiting"].status_code == 503
    assert results["running"].status_code == 200
    assert results["running"].json()["usage"]["completion_tokens"] == 300
    assert proc.process.wait(60) == 0, proc.log()[-3000:]
    assert "leaving without waiting" not in proc.log()


def test_sigterm_while_quantizing_at_the_first_start_exits_zero_and_leaves_no_checkpoint(start_server, tmp_path):
    proc = start_server(env={"Q8CHAT_CACHE_DIR": str(tmp_path)}, wait=False)
    deadline = time.monotonic() + 120
    while "quantizing:" not in proc.log() and time.monotonic() < deadline and proc.process.poll() is None:
        time.sleep(0.2)
    assert "quantizing:" in proc.log()
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(60) == 0, proc.log()[-3000:]
    assert "stopped while loading the model" in proc.log()
    assert "terminate called" not in proc.log()
    assert not [p for p in tmp_path.rglob("manifest.json")]  # nothing that loads as a checkpoint
