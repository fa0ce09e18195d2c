"""``q8chat bench --concurrency``: many users at once, ``c`` streams started together for each concurrency
``c``, against q8chat served over HTTP (``--max-batch``) and, in process through the same batcher, q8chat's
and llama.cpp's batched decoders (llama.cpp's parallel sequences in one ``llama_decode``, as its server's
slots run). Reports the aggregate decode rate (``summarize``), each stream's inter-token latency (p50,
p95 over all gaps) and time to first token, next to the one-stream figures."""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import aiohttp
import torch

from bench import llamacpp, llamaserver
from bench.chats import chats_served
from bench.concurrency_report import over_rounds
from bench.served import SERVED_NAME, ServerProcess, StreamTiming, served_args, stream_chat, with_session
from prompts import heldout_text
from quant.checkpoint import load_checkpoint, read_checkpoint_info, stored_weight_bytes
from quant.kernels import cpu_class, kernels_by_step
from quant.load import resolve_model_path
from quant.smoothquant import Recipe
from quant.store import int8_checkpoint
from server.engine.batching import DONE, Batcher, Job
from server.engine.engine import Engine, GenerationStats
from server.engine.sampling import SamplingParams
from server.runtime.aoti.steps import package_paths
from server.runtime.compact import kv_dtype_for
from server.runtime.decoders import make_decoder

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # serve's default
T = TypeVar("T")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrent_streams(
    base_url: str, model: str, prompts: list[str], max_tokens: int, first: int = 0
) -> list[StreamTiming]:
    """One stream per prompt, all sent at once, each on a connection of its own; stream ``i`` is conversation
    ``first + i`` (its system message says so: numbers not used before make new conversations)."""

    def one(session: aiohttp.ClientSession, index: int) -> Awaitable[StreamTiming]:
        messages = [
            {"role": "system", "content": f"Conversation {first + index}."},
            {"role": "user", "content": prompts[index]},
        ]
        return stream_chat(session, base_url, model, messages, max_tokens)

    async def streams(session: aiohttp.ClientSession) -> list[StreamTiming]:
        return list(await asyncio.gather(*(one(session, index) for index in range(len(prompts)))))

    return with_session(streams)


def summarize(streams: list[StreamTiming]) -> dict:
    """The aggregate decode rate is counted while every stream decodes (from the last first token to the
    first last token), so that prompts prefilled meanwhile do not count as decode time; their stalls show in
    the inter-token latencies and the times to first token."""
    begin, end = max(s.first_s for s in streams), min(s.last_s for s in streams)
    decoded = sum(sum(begin < t <= end for t in s.times_s) for s in streams)
    gaps = [gap for s in streams for gap in s.gaps_s]
    return {
        "streams": len(streams),
        "completion_tokens": [s.tokens for s in streams],
        "aggregate_decode_tok_s": round(decoded / (end - begin), 1) if end > begin else 0.0,
        "itl_p50_ms": round(_percentile(gaps, 0.5) * 1e3, 2),
        "itl_p95_ms": round(_percentile(gaps, 0.95) * 1e3, 2),
        "ttft_mean_s": round(statistics.fmean(s.ttft_s for s in streams), 3),
        "ttft_max_s": round(max(s.ttft_s for s in streams), 3),
    }


def batched_streams(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[StreamTiming]:
    """The in-process counterpart of ``concurrent_streams``: one greedy job per prompt, all submitted at once
    to a batcher over ``engine``, timed as each token is emitted."""
    batcher = Batcher(engine, PREFILL_CHUNK)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in prompts]
    stats = [GenerationStats() for _ in prompts]
    finished = threading.Semaphore(0)

    def emitter(index: int):
        def emit(item) -> None:
            if item is DONE:
                finished.release()
            elif isinstance(item, Exception):
                raise item
            else:
                times[index].append(time.perf_counter())

        return emit

    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        batcher.submit(Job(prompt, lambda _, i=index: (params, stats[i], None), emitter(index)))
    for _ in prompts:
        finished.acquire()
    batcher.close()
    return [
        StreamTiming(
            start_s=start,
            times_s=chunk_times,
            tokens=len(chunk_times),
            text="",
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
        )
        for chunk_times, s in zip(times, stats, strict=True)
    ]


def _gguf(args, checkpoint_path: Path) -> Path | None:
    """The llama.cpp competitors' Q8_0 GGUF of the model (None without llama-cpp-python)."""
    if not llamacpp.available():
        return None
    threads = torch.get_num_threads()
    return llamacpp.q8_0_gguf(resolve_model_path(args.model), args.cache_dir, threads, args.llama_cpp_converter)


def kv_cache_dtype(kv: str | None, checkpoint, slots: int) -> torch.dtype:
    """The KV cache type of q8chat's compiled steps with ``slots`` sequences, as ``--kv-cache-dtype kv`` makes it
    (None: serve's default)."""
    return kv_dtype_for(kv or "auto", checkpoint.config, slots, compiled=True)


def _engines(checkpoint, cache_dir: Path, context: int, slots: int, gguf: Path | None, kv: str | None):
    """(name, engine) of each in-process competitor: q8chat's compiled decoder (its KV cache as ``kv_cache_dtype``
    gives it) and llama.cpp's on ``gguf`` (the same weights as Q8_0), each with ``slots`` sequences."""
    kernels = kernels_by_step(weight_bytes=stored_weight_bytes(checkpoint.path))
    kv_dtype = kv_cache_dtype(kv, checkpoint, slots)
    packages = package_paths(cache_dir, checkpoint.path, context, kernels, kv_dtype, slots)
    decoder = make_decoder(
        lambda: load_checkpoint(checkpoint.path).model, checkpoint.config, context, packages, kernels, kv_dtype, slots
    )
    yield "q8chat", Engine(decoder, checkpoint.tokenizer, context, set())
    if gguf is not None:
        decoder = llamacpp.LlamaCppDecoder(gguf, context, torch.get_num_threads(), slots)
        yield llamacpp.VARIANT, Engine(decoder, checkpoint.tokenizer, context, set())


def _prepare(args, context: int, slots: int):
    """The INT8 checkpoint, the competitors' GGUF (or None) and the in-process engines, built."""
    checkpoint = read_checkpoint_info(
        int8_checkpoint(args.model, Recipe(calib_samples=args.calib_samples), args.cache_dir)
    )
    gguf = _gguf(args, checkpoint.path)
    return checkpoint, gguf, dict(_engines(checkpoint, args.cache_dir, context, slots, gguf, args.kv_cache_dtype))


def on_a_passing_thread(make: Callable[[], T]) -> T:
    """``make()``, computed on a thread that then ends, so that the main thread runs no parallel region.
    libgomp (torch's OpenMP runtime, and llama.cpp's) spins at a barrier only while it manages no more threads
    than there are CPUs, and a thread that has run a parallel region keeps its team until it ends: the
    batcher's thread would get a second team, whose barriers sleep and wake (on 2 cores the compiled steps ran
    three times slower, and llama.cpp twice). ``q8chat serve`` is built the same way: it loads on a thread
    that ends, and computes on the batcher's alone."""
    with ThreadPoolExecutor(1, thread_name_prefix="q8chat-prepare") as pool:
        return pool.submit(make).result()


def _q8chat_flags(args, checkpoint, context: int, max_batch: int) -> list[str]:
    flags = served_args(checkpoint.path, args.cache_dir, context, True, kv=args.kv_cache_dtype)
    return flags + ["--max-batch", str(max_batch)]


def _servers(args, checkpoint, context: int, slots: int, gguf: Path | None, log_dir: Path) -> dict:
    """The served competitors, started: ``q8chat serve --max-batch slots``, and llama.cpp's server with as
    many parallel slots on ``gguf`` where it can be built (first, so that its build does not share the cores
    with q8chat's first start)."""
    command = None
    if gguf is not None:
        try:
            command = [str(llamaserver.binary(args.cache_dir))]
        except llamacpp.LlamaCppUnavailable as exc:
            log.warning("no %s competitor: %s", llamaserver.NAME, exc)
    servers = {
        "q8chat-served": ServerProcess(_q8chat_flags(args, checkpoint, context, slots), {}, log_dir / "serve.log")
    }
    if command is not None:
        flags = llamaserver.server_args(gguf, context, slots, torch.get_num_threads(), SERVED_NAME)
        servers[llamaserver.NAME] = ServerProcess(flags, {}, log_dir / "llama-server.log", command=command)
    return servers


def run(args) -> dict:
    """``q8chat bench --concurrency``: each concurrency level, in process for q8chat and llama.cpp (the same
    engine loop and batcher; only the batched forward differs) and over HTTP for ``q8chat serve
    --max-batch`` and llama.cpp's server, levels interleaved across competitors; then two users alternating
    chats with ``q8chat serve``."""
    if args.decode_tokens < 2:
        raise SystemExit("q8chat bench --concurrency: --decode-tokens must be 2 or more (each stream's token gaps)")
    levels = sorted({int(level) for level in args.concurrency.split(",")})
    slots, context = max(levels), args.prompt_tokens + args.decode_tokens + 64
    checkpoint, gguf, engines = on_a_passing_thread(lambda: _prepare(args, context, slots))
    base = checkpoint.tokenizer(heldout_text(), add_special_tokens=False).input_ids[: args.prompt_tokens - 1]
    log_dir = Path(tempfile.mkdtemp(prefix="q8chat-bench-"))
    servers = _servers(args, checkpoint, context, slots, gguf, log_dir)
    conversations = iter(range(10**6))  # every stream a prompt of its own: nothing comes from a cache
    rounds: list[dict[str, dict[int, dict]]] = []
    try:
        text = checkpoint.tokenizer.decode(base)
        for name, engine in engines.items():  # warm-up
            batched_streams(engine, [[next(conversations)] + base[:32]], 4)
        for server in servers.values():
            server.wait_ready(3600)
            concurrent_streams(server.base_url, SERVED_NAME, [text[:200]], 4, next(conversations))
        for rep in range(args.reps):
            results: dict[str, dict[int, dict]] = {name: {} for name in [*engines, *servers]}
            for level in levels:
                for name, engine in engines.items():
                    prompts = [[next(conversations)] + base for _ in range(level)]
                    results[name][level] = summarize(batched_streams(engine, prompts, args.decode_tokens))
                for name, server in servers.items():
                    first = next(conversations)
                    [next(conversations) for _ in range(level)]
                    streams = concurrent_streams(
                        server.base_url, SERVED_NAME, [text] * level, args.decode_tokens, first
                    )
                    results[name][level] = summarize(streams)
                for name, rows in results.items():
                    print(f"round {rep + 1}/{args.reps}, {name} at {level}: {rows[level]}", flush=True)
            rounds.append(results)
    finally:
        for server in servers.values():
            server.stop()
    chats = {}
    for max_batch in sorted({1, slots}):
        flags = _q8chat_flags(args, checkpoint, context, max_batch)
        chats[f"--max-batch {max_batch}"] = chats_served(flags, log_dir / f"chats-{max_batch}.log")
        print(f"two users alternating with --max-batch {max_batch}: {chats[f'--max-batch {max_batch}']}", flush=True)
    return {
        "machine": {"threads": torch.get_num_threads(), **cpu_class()},
        "workload": {
            "model": args.model,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "max_batch": slots,
            "rounds": args.reps,
            "kv_cache_dtype": str(kv_cache_dtype(args.kv_cache_dtype, checkpoint, slots)).removeprefix("torch.")
            + ("" if args.kv_cache_dtype else " (serve's default)"),
            "server_logs": str(log_dir),
        },
        "concurrency": over_rounds(rounds),
        "rounds": rounds,
        "alternating_chats": chats,
    }
