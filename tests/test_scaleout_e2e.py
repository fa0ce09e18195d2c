"""Scale-out without Docker: real nginx (deploy/nginx-local.conf.template, the same proxy settings as the
compose file) in front of two real q8chat replicas, each pinned to a different core."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from string import Template

import httpx
import pytest

from bench.served import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.fixture(scope="module")
def cluster(start_server, tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (make system-deps installs it): scale-out not tested")
    cores = sorted(os.sched_getaffinity(0))
    pins = [cores[0], cores[-1]]  # two different cores where the machine has them
    # as a compose cpuset does: each replica's process may only run on its core, and places itself there
    replicas = [start_server(wait=False, launcher=["taskset", "-c", str(c)]) for c in pins]
    for replica in replicas:
        replica.wait_ready(600)
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = Template((ROOT / "deploy/nginx-local.conf.template").read_text()).safe_substitute(
        PORT_A=replicas[0].port, PORT_B=replicas[1].port, PORT_NGINX=port, PREFIX=prefix, DEPLOY_DIR=ROOT / "deploy"
    )
    (prefix / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        [NGINX, "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(50):
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base, replicas, prefix / "access.log", pins
    nginx.terminate()
    nginx.wait(10)


def chat(base, **extra):
    return httpx.post(
        base + "/v1/chat/completions",
        timeout=120,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **extra},
    )


def test_replicas_are_pinned_to_different_cores(cluster):
    _, replicas, _, pins = cluster
    for replica, core in zip(replicas, pins):
        affinity = Path(f"/proc/{replica.process.pid}/status").read_text()
        assert re.search(rf"Cpus_allowed_list:\s+{core}\n", affinity)
        assert f"cores {core}, 1 threads" in replica.log()


def test_requests_spread_across_both_replicas(cluster):
    base, replicas, access_log, _ = cluster
    import threading

    threads = [threading.Thread(target=chat, args=(base,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.2)
    served_by = re.findall(r"upstream=127\.0\.0\.1:(\d+)", access_log.read_text())
    assert {str(r.port) for r in replicas} <= set(served_by)


def test_streaming_passes_through_unbuffered(cluster):
    base, *_ = cluster
    arrivals = []
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        timeout=120,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 60,
            "ignore_eos": True,
            "logprobs": True,  # a chunk for every token, also those past EOS whose text is empty
            "stream": True,
        },
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    # tokens arrive over the generation, not in one burst at its end
    assert len(arrivals) > 50
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.25 * (arrivals[-1] - arrivals[0]) > 0


def test_a_replica_going_down_does_not_fail_the_next_requests(cluster):
    base, replicas, _, _ = cluster
    replicas[0].stop()
    statuses = [chat(base).status_code for _ in range(4)]
    assert statuses == [200] * 4
