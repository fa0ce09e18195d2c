"""End to end: the real server, the real default model (INT8), real HTTP on loopback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path, body=None, content=None, **kwargs):
    return httpx.post(server.base_url + path, json=body, content=content, timeout=120, **kwargs)


def sse_events(response) -> list[str]:
    """The raw SSE lines of a streamed response (data and comments)."""
    return [line for line in response.iter_lines() if line]


def assert_still_serving(server):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_health_and_models(server):
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


def test_chat_non_stream_with_the_openai_client(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 24


def test_greedy_stream_equals_greedy_non_stream(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=40,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_completions_stream_and_non_stream(client):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_sse_framing_usage_chunk_and_done(server):
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in sse_events(r) if not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_seed_reproduces_sampled_output(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        max_tokens=24,
        temperature=1.0,
        top_p=0.95,
        seed=1234,
    )
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_stop_string_is_not_emitted(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=40,
        temperature=0,
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]
    r = client.chat.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_second_turn_reuses_the_cached_prefix(client):
    history = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a vegetable?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_streamed_accented_text_arrives_whole(client):
    """The greedy answer has accents (multi-byte UTF-8 that tokens may split): each streamed delta is whole
    text, and together they are the non-streamed answer. (With a reply in ASCII this would prove nothing.)"""
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write the French word café three times."}],
        max_tokens=24,
        temperature=0,
    )
    deltas = [
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
    ]
    text = "".join(deltas)
    assert any(ord(character) > 127 for character in text), text
    assert all("\ufffd" not in delta for delta in deltas)
    assert text == client.chat.completions.create(**kwargs).choices[0].message.content


BAD_REQUESTS = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", {"model": MODEL, "messages": QUESTION, "max_tokens": "many"}, 400, "max_tokens"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("non-string content", {"model": MODEL, "messages": [{"role": "user", "content": 42}]}, 400, "messages"),
    ("n above 16", {"model": MODEL, "messages": QUESTION, "n": 17}, 400, "n"),
    ("unknown parameter", {"model": MODEL, "messages": QUESTION, "best_of_luck": True}, 400, "best_of_luck"),
    ("logit_bias", {"model": MODEL, "messages": QUESTION, "logit_bias": {"42": 5}}, 400, "logit_bias"),
    ("missing model", {"messages": QUESTION}, 400, "model"),
    ("unknown model", {"model": "gpt-4", "messages": QUESTION}, 404, "model"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_shaped_errors(server, name, body, status, param):
    r = post(server, "/v1/chat/completions", **({"content": body} if isinstance(body, bytes) else {"body": body}))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if name == "unknown model":
        assert error["code"] == "model_not_found"
    assert_still_serving(server)


def test_context_length_exceeded_before_streaming(server):
    long = "word " * 9000
    for stream in (False, True):
        r = post(
            server,
            "/v1/chat/completions",
            {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": long}]},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert_still_serving(server)


def test_unknown_route_and_oversized_body(server):
    r = httpx.get(server.base_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = post(
        server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert_still_serving(server)


def long_stream_body(tokens=400):
    return {"model": MODEL, "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True, "stream": True}


def test_dropped_streams_free_the_server(server):
    """Open several long streams, drop them after their first token: a fresh request then completes
    promptly instead of waiting for thousands of abandoned tokens."""
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=long_stream_body(), timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content":""' not in line:
                    break  # first real token: hang up
    started = time.monotonic()
    assert_still_serving(server)
    # 3 x 400 abandoned tokens would take minutes at eager speed; a freed server answers in seconds
    assert time.monotonic() - started < 60


def test_queue_overflow_answers_429_never_hangs(server):
    """max_queue is 2: of 8 concurrent requests, one runs, two wait, the rest get 429 at once."""
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def request():
        r = post(
            server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "ignore_eos": True}
        )
        with lock:
            results.append(r)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 8 and set(statuses) <= {200, 429}
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    rejected = next(r for r in results if r.status_code == 429)
    assert rejected.headers["retry-after"] and rejected.json()["error"]["type"] == "rate_limit_error"
    assert_still_serving(server)


def test_keepalive_comments_while_waiting_for_the_turn(server):
    """A stream waiting behind a long generation receives SSE comments, not silence."""
    blocker = threading.Thread(
        target=post, args=(server, "/v1/chat/completions", {**long_stream_body(120), "stream": False})
    )
    blocker.start()
    time.sleep(1.0)
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True},
        timeout=300,
    ) as r:
        lines = sse_events(r)
    blocker.join()
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
    assert any(line.startswith(":") for line in lines[:first_content])  # comments while it waited its turn
    assert lines[-1] == "data: [DONE]"


def test_a_published_mpt_directory_in_shards_is_quantized_and_served(start_server, tokenizer, tmp_path):
    """A Hugging Face MPT directory as MPT-7B-chat ships (PyTorch shards and their index; no chat template
    of its own), served as `q8chat serve --model DIR` serves it: quantized at start-up, the ChatML template
    chosen for it, its context its config's max_seq_len."""
    from tests.harness import tiny_mpt

    model = tiny_mpt(len(tokenizer))
    model.save_pretrained(tmp_path / "mpt", max_shard_size="300KB", safe_serialization=False)
    tokenizer.save_pretrained(tmp_path / "mpt")
    (tmp_path / "mpt" / "chat_template.jinja").unlink(missing_ok=True)  # MPT-7B-chat ships none
    config = json.loads((tmp_path / "mpt" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "mpt" / "tokenizer_config.json").write_text(json.dumps(config))
    mpt = start_server("--model", str(tmp_path / "mpt"), "--calib-samples", "4", "--alpha", "0.5")
    assert "template chatml" in mpt.log() and f"context {model.config.max_seq_len} tokens" in mpt.log()
    body = {"model": "mpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}
    answer = httpx.post(mpt.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5, answer.text
    body["messages"][0]["content"] = "hi " * 300
    too_long = httpx.post(mpt.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    mpt.stop()
