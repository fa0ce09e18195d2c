"""Bad input at the HTTP layer, with a fake engine: every malformed or off-spec request gets an OpenAI-shaped
4xx naming what is wrong, never a 500, and the app keeps serving. Each case here got a 500, or was accepted,
before the layer was hardened (issue #14's repros)."""

import json
import logging

import pytest
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from prompts import builtin_template
from server.http.app import ServiceSlot, create_app
from server.http.errors import as_api_error
from server.service.prompter import Prompter
from server.service.serving import ChatService
from tests.harness import FakeEngine

URL = "/v1/chat/completions"
M = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def client(tokenizer):
    service = ChatService(FakeEngine(), Prompter(tokenizer, builtin_template("chatml")), "tiny", 4, 16)
    with TestClient(create_app(ServiceSlot(service))) as client:
        yield client


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    return error


def still_serving(client) -> None:
    response = client.post(URL, json=M)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


LOOSE = [  # values OpenAI's schema types strictly: accepted by coercion before
    ("stream", "yes"),
    ("max_tokens", "4"),
    ("max_tokens", True),
    ("temperature", "0.5"),
    ("top_k", 2.0),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("stop", ["a", "b", "c", "d", "e"]),
]


@pytest.mark.parametrize("field,value", LOOSE, ids=[f"{f}={v!r}"[:30] for f, v in LOOSE])
def test_values_of_the_wrong_type_or_range_are_400s_naming_the_field(client, field, value):
    assert_error(client.post(URL, json={**M, field: value}), 400, param=field)
    still_serving(client)


def test_a_64_bit_seed_is_accepted(client):
    assert client.post(URL, json={**M, "seed": 2**63 - 1}).status_code == 200
    assert client.post(URL, json={**M, "seed": -(2**63)}).status_code == 200


# "\x04" is text the tokenizer makes no token of (a concurrent fuzz run got the engine's error mid-stream)
@pytest.mark.parametrize("prompt", ["", [""], ["a", "b"], [], "\x04", ["\x04\x06"]])
@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_tokenless_or_batched_completion_prompt_is_a_400_before_streaming(client, prompt, stream):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "stream": stream}
    assert_error(client.post("/v1/completions", json=body), 400, param="prompt")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "messages": [], "temperature": NaN}',
        b'{"model": "tiny", "temperature": Infinity}',
        b'{"a": -Infinity}',
    ],
)
def test_nan_and_infinity_are_not_json(client, raw):
    error = assert_error(
        client.post(URL, content=raw, headers={"content-type": "application/json"}), 400, code="invalid_json"
    )
    assert "not valid JSON" in error["message"]


def test_json_nested_100000_deep_is_a_400(client):
    raw = b"[" * 100_000 + b"]" * 100_000
    assert_error(client.post(URL, content=raw), 400, code="invalid_json")
    still_serving(client)


@pytest.mark.parametrize("where", ["content", "model", "key"])
def test_a_lone_surrogate_is_a_400_and_the_connection_survives(client, where):
    body = json.dumps(M)
    body = {
        "content": body.replace('"hi"', '"hi \\ud800"'),
        "model": body.replace('"tiny"', '"\\udfff"'),
        "key": body.replace('"max_tokens"', '"\\ud800"'),
    }[where]
    error = assert_error(client.post(URL, content=body.encode()), 400, code="invalid_json")
    assert "surrogate" in error["message"]
    still_serving(client)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-16"]
)
def test_a_body_not_declared_as_utf8_json_is_a_415(client, content_type):
    assert_error(
        client.post(URL, content=json.dumps(M).encode(), headers={"content-type": content_type}),
        415,
        code="unsupported_media_type",
    )


def test_json_declared_without_a_content_type_or_as_a_json_subtype_is_read(client):
    assert client.post(URL, content=json.dumps(M).encode()).status_code == 200
    headers = {"content-type": "application/vnd.api+json; charset=UTF-8"}
    assert client.post(URL, content=json.dumps(M).encode(), headers=headers).status_code == 200


def test_a_utf16_body_is_a_400_not_json_by_guesswork(client):
    raw = json.dumps(M).encode("utf-16")
    assert_error(client.post(URL, content=raw, headers={"content-type": "application/json"}), 400, code="invalid_json")


def test_405_names_the_allowed_methods(client):
    response = client.get(URL)
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_a_client_that_leaves_is_a_499_not_a_server_error(caplog):
    with caplog.at_level(logging.ERROR):
        error = as_api_error(ClientDisconnect())
    assert error.status == 499 and error.body.code == "client_closed_request"
    assert not caplog.records  # nothing logged as an internal error


def test_the_published_api_has_request_bodies_error_responses_and_a_text_metrics_endpoint(client):
    spec = client.get("/openapi.json").json()
    chat = spec["paths"][URL]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"200", "400", "404", "413", "415", "429", "503"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    request = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert request["properties"]["temperature"]["maximum"] == 2 and request["additionalProperties"] is False
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert spec["paths"]["/health"]["get"]["responses"]["503"]
