"""Shared fixtures: the real default tokenizer, tiny random Llama/MPT models, and the real server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.served import ServerProcess
from tests.harness import tiny_checkpoint, tiny_llama, tiny_mpt

ROOT = Path(__file__).resolve().parent.parent
Q8CHAT_SERVE = (str(Path(sys.executable).parent / "q8chat"), "serve")  # what `make serve` runs


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory) -> Path:
    """In-process compilations cache under the session's temporary directory, which pytest prunes: inductor's
    default, /tmp/torchinductor_$USER, grows by gigabytes with each run and is never pruned."""
    path = tmp_path_factory.mktemp("inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from quant.load import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(params=["llama", "mpt"])
def tiny_model(request, tokenizer):
    build = {"llama": tiny_llama, "mpt": tiny_mpt}[request.param]
    return build(len(tokenizer))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Quantized checkpoints shared by the tests of one session (the first server start quantizes)."""
    return tmp_path_factory.mktemp("q8chat-cache")


@pytest.fixture(scope="session")
def start_server(cache_dir, tmp_path_factory):
    """Start real servers on the default INT8 model, quantized by the default recipe once per session into
    ``cache_dir`` (as `make serve` does at its first start)."""
    started: list[ServerProcess] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        launcher: list[str] = (),
        command: tuple[str, ...] = (sys.executable, "-m", "server"),
    ) -> ServerProcess:
        # eager decoding unless a test asks for --compile: compiling takes minutes per model
        proc = ServerProcess(
            list(args),
            {"Q8CHAT_CACHE_DIR": str(cache_dir), "Q8CHAT_COMPILE": "false", **(env or {})},
            tmp_path_factory.mktemp("logs") / "server.log",
            launcher,
            command,
        )
        started.append(proc)
        if wait:
            proc.wait_ready(timeout=1800)  # the first start quantizes (minutes), a compiled one compiles too
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.stop()


@pytest.fixture(scope="session")
def server(start_server):
    return start_server("--max-queue", "2", "--keepalive-s", "0.5")


def _start_tiny(start_server, tokenizer, tmp_path_factory, *flags: str):
    checkpoint = tiny_checkpoint(tokenizer, tmp_path_factory.mktemp("tiny") / "tiny")
    return start_server(
        "--model",
        str(checkpoint),
        "--context-length",
        "256",
        "--body-timeout-s",
        "1",
        "--max-queue",
        "64",
        *flags,
        env={"Q8CHAT_CACHE_DIR": str(tmp_path_factory.mktemp("tiny-cache"))},
    )


@pytest.fixture(scope="session")
def tiny_server(start_server, tokenizer, tmp_path_factory):
    """A real server on a tiny random INT8 model: the whole HTTP surface at thousands of tokens a second (what
    the fuzz and robustness tests need; its answers are noise). Bodies time out after 1 s."""
    return _start_tiny(start_server, tokenizer, tmp_path_factory)


@pytest.fixture(scope="session")
def batched_tiny_server(start_server, tokenizer, tmp_path_factory):
    """``tiny_server`` decoding up to four generations together, with a prefix cache small enough to evict."""
    return _start_tiny(start_server, tokenizer, tmp_path_factory, "--max-batch", "4", "--kv-cache-mb", "1")
