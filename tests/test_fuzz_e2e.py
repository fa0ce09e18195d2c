"""A bounded fuzz run of the published API: Schemathesis generates requests from ``/openapi.json`` (valid ones,
and for the operations with a body ones that break the schema) and they go to a real server on a tiny model. No request
may get a 5xx, every 4xx is OpenAI-shaped, every response matches what the API publishes, and the server is
healthy afterwards. Hypothesis draws derandomized: the same requests on every run. (An outside run of this
kind found 63 answers of 500 in 440 requests.)"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

EXAMPLES = 100  # per operation and mode: 800 requests with a body in all
BODIES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")]
READS = [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/")]
CONCURRENT = 8  # requests sent at once in the concurrent run, to a server batching four
CONCURRENT_ROUNDS = 40
RUNS = [
    (method, path, mode) for method, path in BODIES for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
] + [(method, path, GenerationMode.POSITIVE) for method, path in READS]
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def published(tiny_server):
    load_all_checks()
    return schemathesis.openapi.from_url(tiny_server.base_url + "/openapi.json")


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
def test_generated_requests_get_no_5xx_and_openai_shaped_4xx(published, tiny_server, method, path, mode):
    strategy = published[path][method].as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=st.data())
    def run(data):
        case = data.draw(strategy)
        response = case.call(base_url=tiny_server.base_url, timeout=60)
        assert_no_5xx_and_openai_shaped(case, response)
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=CHECKS)

    run()


def assert_no_5xx_and_openai_shaped(case, response) -> None:
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_generated_requests_sent_together_to_a_batching_server_get_no_5xx(batched_tiny_server):
    """Generated bodies (valid and schema-breaking) for the generating operations, eight at a time, so that
    the batcher runs mixed sampling, grammars, log probabilities, choices and stops together; every third
    stream is cut after its first bytes. No 5xx, no error in the server's log, and it keeps serving."""
    spec = schemathesis.openapi.from_url(batched_tiny_server.base_url + "/openapi.json")
    bodies = st.one_of(
        *(
            spec[path]["POST"].as_strategy(generation_mode=mode)
            for path in ("/v1/chat/completions", "/v1/completions")
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        )
    )

    def send(numbered) -> None:
        number, case = numbered
        if number % 3 == 0 and isinstance(case.body, dict) and case.body.get("stream") is True:
            with httpx.stream("POST", batched_tiny_server.base_url + case.path, json=case.body, timeout=60) as cut:
                next(cut.iter_bytes(), None)  # then hang up
            return
        assert_no_5xx_and_openai_shaped(case, case.call(base_url=batched_tiny_server.base_url, timeout=120))

    @settings(
        max_examples=CONCURRENT_ROUNDS,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases=st.lists(bodies, min_size=CONCURRENT, max_size=CONCURRENT))
    def run(cases):
        with ThreadPoolExecutor(CONCURRENT) as pool:
            list(pool.map(send, enumerate(cases)))

    run()
    assert httpx.get(batched_tiny_server.base_url + "/health").json()["status"] == "ok"
    log = batched_tiny_server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-5000:]


def test_the_server_is_healthy_after_the_fuzz_run(tiny_server):
    assert httpx.get(tiny_server.base_url + "/health").json()["status"] == "ok"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(tiny_server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert "Traceback" not in tiny_server.log()
