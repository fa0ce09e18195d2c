"""Speed as a client sees it: start ``q8chat serve`` the way a user does, time it until healthy, stream
chat completions over HTTP (SSE), and read the server process's resident memory.

``ServerProcess`` is also what the end-to-end tests start servers with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import httpx
import uvloop

from bench.results import Sample

SERVED_NAME = "q8chat-bench"  # the model name the benchmark's servers serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real ``q8chat serve`` subprocess on loopback."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        launcher: list[str] = (),
        command: list[str] = (sys.executable, "-m", "server"),
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [*launcher, *command, "--port", str(self.port), *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float) -> float:
        """Seconds from launch until ``/health`` answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-5000:]}")

    def resident_bytes(self) -> dict[str, int]:
        """Resident memory now (VmRSS) and at its peak (VmHWM), from /proc."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}

    def log(self) -> str:
        """The whole log (errors quote its tail)."""
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@dataclass
class StreamTiming:
    start_s: float  # perf_counter when the request was sent
    times_s: list[float]  # ... at each content chunk (a token's text; the last chunk if none has text)
    tokens: int  # completion tokens
    text: str
    prompt_tokens: int
    cached_tokens: int

    @property
    def first_s(self) -> float:
        return self.times_s[0]

    @property
    def last_s(self) -> float:
        return self.times_s[-1]

    @property
    def ttft_s(self) -> float:
        return self.first_s - self.start_s

    @property
    def decode_tok_s(self) -> float:
        """Completion tokens after the first over the time from the first content chunk to the last."""
        span = self.last_s - self.first_s
        return (self.tokens - 1) / span if span else 0.0

    @property
    def gaps_s(self) -> list[float]:
        """Between consecutive content chunks: the inter-token latencies."""
        return [later - earlier for earlier, later in zip(self.times_s, self.times_s[1:], strict=False)]


T = TypeVar("T")


def with_session(requests: Callable[[aiohttp.ClientSession], Awaitable[T]], keep_alive: bool = True) -> T:
    """What ``requests(session)`` returns, run in an event loop of its own (uvloop, as the server's) on a new
    client session. One loop reads all the streams of a run, with aiohttp's C parser: the client runs on the
    CPUs the server runs on, and a thread and an httpx client a stream took twice the CPU time a token.
    ``keep_alive``: False opens a connection a request (``llama-server`` closes kept-alive ones on its own
    schedule, and a request sent on one it is closing fails)."""

    async def run() -> T:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=not keep_alive)) as session:
            return await requests(session)

    return uvloop.run(run())


async def stream_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    messages: list[dict],
    max_tokens: int,
    response_format: dict | None = None,
    ignore_eos: bool = True,
) -> StreamTiming:
    """One greedy streamed chat completion, timed per chunk: exactly ``max_tokens`` tokens, EOS ignored, unless
    ``ignore_eos`` is false. ``response_format``: the answer is held to it (its grammar must not end before
    ``max_tokens``: a grammar's end stops the answer)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"response_format": response_format} if response_format else {}),
    }
    chunk_times, text, usage = [], [], None
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with session.post(base_url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        response.raise_for_status()
        async for line in response.content:  # SSE lines
            line = line.rstrip(b"\r\n")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix(b"data: "))
            usage = chunk.get("usage") or usage
            choice = chunk["choices"][0] if chunk["choices"] else {}
            if choice.get("delta", {}).get("content") or (choice.get("finish_reason") and not chunk_times):
                chunk_times.append(time.perf_counter())  # a token's text, or the end of a reply without any
                text.append(choice["delta"].get("content") or "")
    return StreamTiming(
        start_s=start,
        times_s=chunk_times,
        tokens=usage["completion_tokens"],
        text="".join(text),
        prompt_tokens=usage["prompt_tokens"],
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    )


class Served:
    """``q8chat serve`` (or another OpenAI-compatible server's ``command``, such as ``llama-server``) in its
    own process, measured over HTTP as a client sees it. It is started twice: the second start is a restart
    with the quantized checkpoint and compiled kernels already cached."""

    def __init__(
        self,
        server_args: list[str],
        model_name: str,
        tokenizer,
        log_dir: Path,
        timeout_s: float = 3600,
        response_format: dict | None = None,
        command: list[str] = (sys.executable, "-m", "server"),
    ) -> None:
        self.model_name, self.tokenizer, self.response_format = model_name, tokenizer, response_format
        self.command, name = command, Path(command[-1]).name
        self.extra = {"first_start_s": self._start(server_args, log_dir / f"{name}-first-start.log", timeout_s)}
        self.server.stop()
        self.extra["restart_s"] = self._start(server_args, log_dir / f"{name}.log", timeout_s)
        self._conversations = 0

    def _start(self, server_args: list[str], log_path: Path, timeout_s: float) -> float:
        self.server = ServerProcess(server_args, {}, log_path, command=self.command)
        try:
            return round(self.server.wait_ready(timeout_s), 1)
        except Exception:
            self.server.stop()
            raise

    def measure(self, prompt: list[int], decode_tokens: int, new_tokens: int):
        self._conversations += 1  # a new system message each time: the server cannot reuse the last one
        system = {"role": "system", "content": f"Conversation {self._conversations}."}
        user = {"role": "user", "content": self.tokenizer.decode(prompt)}
        first = self._stream([system, user], decode_tokens)
        follow_up = [
            system,
            user,
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": self.tokenizer.decode(prompt[:new_tokens])},
        ]
        second = self._stream(follow_up, 1)
        self.extra.update(
            prompt_tokens=first.prompt_tokens,
            first_turn_cached_tokens=first.cached_tokens,
            second_turn_prompt_tokens=second.prompt_tokens,
            second_turn_cached_tokens=second.cached_tokens,
        )
        return Sample(ttft_s=first.ttft_s, decode_tok_s=first.decode_tok_s, second_turn_ttft_s=second.ttft_s)

    def _stream(self, messages: list[dict], max_tokens: int) -> StreamTiming:
        return with_session(
            lambda session: stream_chat(
                session, self.server.base_url, self.model_name, messages, max_tokens, self.response_format
            ),
            keep_alive=False,
        )

    def figures(self) -> dict:
        memory = self.server.resident_bytes()
        return {**self.extra, "rss_mb": round(memory["VmRSS"] / 1e6, 1), "peak_rss_mb": round(memory["VmHWM"] / 1e6, 1)}

    def stop(self) -> None:
        self.server.stop()


def served_args(
    checkpoint: Path, cache_dir: Path, context: int, compile: bool, kernel: str = "auto", kv: str | None = None
) -> list[str]:
    """``q8chat serve`` flags serving the in-process variants' INT8 checkpoint with the same context."""
    return [
        "--model",
        str(checkpoint),
        "--served-model-name",
        SERVED_NAME,
        "--cache-dir",
        str(cache_dir),
        "--context-length",
        str(context),
        "--compile" if compile else "--no-compile",
        "--int8-kernel",
        kernel,
        *(["--kv-cache-dtype", kv] if kv else []),
    ]
