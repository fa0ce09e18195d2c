"""A bounded fuzz run of the published API: Schemathesis generates requests from ``/openapi.json`` (valid ones,
and for the operations with a body ones that break the schema) and they go to a real server on a tiny model. No request
may get a 5xx, every 4xx is OpenAI-shaped, every response matches what the API publishes, and the server is
healthy afterwards. Hypothesis draws derandomized: the same requests on every run. (An outside run of this
kind found 63 answers of 500 in 440 requests.)"""

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
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=CHECKS)

    run()


def test_the_server_is_healthy_after_the_fuzz_run(tiny_server):
    assert httpx.get(tiny_server.base_url + "/health").json()["status"] == "ok"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(tiny_server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert "Traceback" not in tiny_server.log()
