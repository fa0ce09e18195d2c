"""The HTTP layer with a fake engine: internal failures are a 500 without internals, and the server
keeps serving."""

from fastapi.testclient import TestClient

from prompts import builtin_template
from server.http.app import ServiceSlot, create_app
from server.service.prompter import Prompter
from server.service.serving import ChatService
from tests.harness import FakeEngine


class BrokenEngine(FakeEngine):
    broken = True

    def decode(self, sequences):
        if self.broken:
            raise RuntimeError("secret internal detail")
        return super().decode(sequences)


def test_internal_failure_is_a_bare_500_and_the_server_recovers(tokenizer):
    engine = BrokenEngine()
    service = ChatService(engine, Prompter(tokenizer, builtin_template("chatml")), "tiny", 2, 16)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    # one event loop for all requests, as in the server: without ``with`` each request gets its own loop,
    # and one closed before the failed generation's thread handed its turn back left the next one waiting
    with TestClient(create_app(ServiceSlot(service))) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert '"server_error"' in streamed.text and "secret" not in streamed.text
        assert streamed.text.rstrip().endswith("data: [DONE]")
        engine.broken = False
        ok = client.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello there friend"


def test_health_is_503_until_the_service_is_ready():
    slot = ServiceSlot()
    client = TestClient(create_app(slot))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
