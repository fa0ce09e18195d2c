"""The compiled server end to end, started as `make serve` starts it (the `q8chat serve` command, default
recipe and flags; only its port and cache directory are the test's): its greedy answers follow the eager
server's distribution, its steps run no reference kernel, /health answers during a long prefill, and a
restart loads the compiled steps instead of compiling, with one copy of the constants the two steps have in
common. The decode step is served compiled; the prefill step is built and timed against the eager prefill,
and served by whichever ran faster (on a VNNI EPYC the two ran within a few percent: either can win).

Not identical answers: fused kernels round differently in the last float bit, per-token INT8 turns such a
bit into a whole quantization step now and then, and two near-tied candidates swap. Measured on the default
model (AVX2 EPYC): the log probabilities of the tokens both chose differ by at most 0.36, and where the
answers part, the two candidates were within 0.38 of each other in both servers. So the comparison is by
log probability: up to where the answers part, each server's token is one the other found as likely, within
``NEAR``."""

from __future__ import annotations

import re

import httpx
import pytest

from prompts import heldout_text
from quant.kernels import default_kernels
from server.runtime.aoti import kernels as step_kernels
from tests.conftest import Q8CHAT_SERVE
from tests.harness import health_during
from tests.kernel_audit import onednn_executions, reference_kernels

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["Write a short story about a robot who learns to paint.", "List three uses of a paper clip, one per line."]


NEAR = 0.75  # nats: several times the differences measured, far below what a wrong kernel gives


def greedy(server, content: str, max_tokens: int = 8) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    answer = response.json()
    return {
        "text": answer["choices"][0]["message"]["content"],
        "tokens": answer["usage"]["completion_tokens"],
        "prompt_tokens": answer["usage"]["prompt_tokens"],
        "steps": [
            (entry["token"], {top["token"]: top["logprob"] for top in entry["top_logprobs"]})
            for entry in answer["choices"][0]["logprobs"]["content"]
        ],
    }


def unlike_steps(answer: dict, reference: dict) -> list[str]:
    """Where ``answer`` does not follow ``reference``'s distribution, up to the first token they part at:
    a token not among the other's five most likely, or less likely there than its choice by over NEAR, or
    with log probabilities that differ by over NEAR."""
    faults = []
    for position, ((token, tops), (ref_token, ref_tops)) in enumerate(zip(answer["steps"], reference["steps"])):
        for chosen, mine, other in ((token, tops, ref_tops), (ref_token, ref_tops, tops)):
            if (
                chosen not in other
                or max(other.values()) - other[chosen] > NEAR
                or abs(mine[chosen] - other[chosen]) > NEAR
            ):
                faults.append(f"token {position} {chosen!r}: {mine} against {other}")
        if token != ref_token:
            break
    return faults


COMPILED = {"Q8CHAT_COMPILE": "true", "ONEDNN_VERBOSE": "1"}  # oneDNN names each primitive it runs


def served_references(server) -> list[str]:
    """The reference kernels among what the server's steps ran since it was ready (the build's autotuning
    tries candidates it does not keep)."""
    served = server.log().partition("ready in")[2]
    return reference_kernels({}, onednn_executions(served))


def prefill_served(log: str) -> str:
    """How the server's start-up line says prompts run: ``compiled``, or ``eager: slower compiled`` where the
    build's timing found the compiled prefill slower (or a marker from an earlier start says so)."""
    if "compiled decode step and prefill step (AOTInductor" in log:
        return "compiled"
    if "not using a compiled prefill step (RuntimeError: it ran slower than eager" in log:
        assert "compiled decode step (AOTInductor" in log
        return "eager: slower compiled"
    return "neither: " + log[-3000:]


@pytest.mark.timeout(1800)  # builds both steps at its first start: minutes on 2 cores
def test_the_compiled_server_as_make_serve_starts_it(start_server, server):
    compiled = start_server(env=COMPILED, command=Q8CHAT_SERVE)
    log = compiled.log()
    assert "decode step compiled in" in log and "prefill step compiled in" in log, log[-3000:]
    assert prefill_served(log) in ("compiled", "eager: slower compiled")
    assert step_kernels.REFERENCE not in log  # what each step's GEMMs run is logged at build and load
    eager = [greedy(server, content) for content in PROMPTS]
    assert [answer["tokens"] for answer in eager] == [8] * len(PROMPTS)
    for content, reference in zip(PROMPTS, eager):
        answer = greedy(compiled, content)
        assert answer["prompt_tokens"] == reference["prompt_tokens"] and answer["tokens"] == 8
        assert unlike_steps(answer, reference) == [], (answer["text"], reference["text"])

    # a prompt of thousands of tokens takes the prefill seconds; the event loop keeps serving
    long_prompt = "Summarize this text.\n\n" + heldout_text()[:12000]
    answers = []
    seconds, latencies = health_during(compiled, lambda: answers.append(greedy(compiled, long_prompt, 1)))
    assert answers[0]["prompt_tokens"] > 2000 and seconds > 1.0
    assert len(latencies) > 5 and max(latencies) < 0.5, (seconds, max(latencies))
    assert served_references(compiled) == []
    compiled.stop()

    restarted = start_server(env=COMPILED, command=Q8CHAT_SERVE)
    log = restarted.log()
    assert "loaded the compiled decode step" in log and "step compiled in" not in log
    loaded_prefill = "loaded the compiled prefill step" in log
    assert prefill_served(log) == ("compiled" if loaded_prefill else "eager: slower compiled")
    shared = re.search(r"the compiled steps share ([\d.]+) MB of constants; ([\d.]+) MB of memory given back", log)
    assert shared and float(shared[2]) > 20, log[-2000:]  # pages of constants no kernel reads, at least
    kernels = default_kernels()
    if prefill_served(log) == "compiled" and kernels["decode"] == kernels["prefill"]:
        assert float(shared[1]) > 50, log[-2000:]  # most packed weights are alike
    for content, reference in zip(PROMPTS, eager):
        assert unlike_steps(greedy(restarted, content), reference) == []
    assert served_references(restarted) == []
