"""``q8chat bench --concurrency``: many users at once, ``c`` streams started together for each concurrency
``c``, against q8chat served over HTTP (``--max-batch``) and, in process through the same batcher, q8chat's
and llama.cpp's batched decoders (llama.cpp's parallel sequences in one ``llama_decode``, as its server's
slots run). Reports the aggregate decode rate (``summarize``), each stream's inter-token latency (p50,
p95 over all gaps) and time to first token, next to the one-stream figures."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from bench import llamacpp
from bench.served import SERVED_NAME, ServerProcess, StreamTiming, served_args, stream_chat
from prompts import heldout_text
from quant.checkpoint import load_checkpoint, read_checkpoint_info
from quant.kernels import cpu_class, kernels_by_step
from quant.load import resolve_model_path
from quant.smoothquant import Recipe
from quant.store import int8_checkpoint
from server.engine.batching import DONE, Batcher, Job
from server.engine.engine import Engine, GenerationStats
from server.engine.sampling import SamplingParams
from server.runtime.aoti.steps import package_paths
from server.runtime.decoders import make_decoder
from server.runtime.static_llama import DEFAULT_KV_DTYPE

PREFILL_CHUNK = 512  # serve's default


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def concurrent_streams(
    base_url: str, model: str, prompts: list[str], max_tokens: int, first: int = 0
) -> list[StreamTiming]:
    """One stream per prompt, all sent at once, each from its own client; stream ``i`` is conversation
    ``first + i`` (its system message says so: numbers not used before make new conversations)."""
    ready = threading.Barrier(len(prompts))

    def one(index: int) -> StreamTiming:
        with httpx.Client() as client:
            messages = [
                {"role": "system", "content": f"Conversation {first + index}."},
                {"role": "user", "content": prompts[index]},
            ]
            ready.wait()
            return stream_chat(client, base_url, model, messages, max_tokens)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


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


def _engines(checkpoint, model_spec: str, cache_dir: Path, context: int, slots: int, converter: Path | None):
    """(name, engine) of each in-process competitor: q8chat's compiled decoder and llama.cpp's (Q8_0, the same
    weights) where llama-cpp-python is installed, each with ``slots`` sequences."""
    kernels = kernels_by_step()
    packages = package_paths(cache_dir, checkpoint.path, context, kernels, DEFAULT_KV_DTYPE, slots)
    decoder = make_decoder(
        lambda: load_checkpoint(checkpoint.path).model, checkpoint.config, context, packages, kernels, slots=slots
    )
    yield "q8chat", Engine(decoder, checkpoint.tokenizer, context, set())
    if llamacpp.available():
        threads = torch.get_num_threads()
        gguf = llamacpp.q8_0_gguf(resolve_model_path(model_spec), cache_dir, threads, converter)
        decoder = llamacpp.LlamaCppDecoder(gguf, context, threads, slots)
        yield llamacpp.VARIANT, Engine(decoder, checkpoint.tokenizer, context, set())


def run(args) -> dict:
    """``q8chat bench --concurrency``: each concurrency level, in process for q8chat and llama.cpp (the same
    engine loop and batcher; only the batched forward differs) and over HTTP for ``q8chat serve
    --max-batch``, levels interleaved across competitors."""
    levels = sorted({int(level) for level in args.concurrency.split(",")})
    slots, context = max(levels), args.prompt_tokens + args.decode_tokens + 64
    checkpoint = read_checkpoint_info(
        int8_checkpoint(args.model, Recipe(calib_samples=args.calib_samples), args.cache_dir)
    )
    base = checkpoint.tokenizer(heldout_text(), add_special_tokens=False).input_ids[: args.prompt_tokens - 1]
    engines = dict(_engines(checkpoint, args.model, args.cache_dir, context, slots, args.llama_cpp_converter))
    log_path = Path(tempfile.mkdtemp(prefix="q8chat-bench-")) / "serve.log"
    served_flags = served_args(checkpoint.path, args.cache_dir, context, True) + ["--max-batch", str(slots)]
    server = ServerProcess(served_flags, {}, log_path)
    conversations = iter(range(10**6))  # every stream a prompt of its own: nothing comes from a cache
    results: dict[str, dict[int, dict]] = {name: {} for name in [*engines, "q8chat-served"]}
    try:
        server.wait_ready(3600)
        text = checkpoint.tokenizer.decode(base)
        for name, engine in engines.items():  # warm-up
            batched_streams(engine, [[next(conversations)] + base[:32]], 4)
        concurrent_streams(server.base_url, SERVED_NAME, [text[:200]], 4, next(conversations))
        for level in levels:
            for name, engine in engines.items():
                prompts = [[next(conversations)] + base for _ in range(level)]
                results[name][level] = summarize(batched_streams(engine, prompts, args.decode_tokens))
            first = next(conversations)
            [next(conversations) for _ in range(level)]
            streams = concurrent_streams(server.base_url, SERVED_NAME, [text] * level, args.decode_tokens, first)
            results["q8chat-served"][level] = summarize(streams)
            for name, rows in results.items():
                print(f"{name} at {level}: {rows[level]}", flush=True)
    finally:
        server.stop()
    return {
        "machine": {"threads": torch.get_num_threads(), **cpu_class()},
        "workload": {
            "model": args.model,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "max_batch": slots,
            "server_log": str(log_path),
        },
        "concurrency": results,
    }


def markdown(report: dict) -> str:
    """One row per competitor and level: aggregate decode against the competitor's own single stream, and
    against llama.cpp's at the same level."""
    results = report["concurrency"]
    lines = [
        f"CPU: {report['machine']['model_name']} ({' '.join(report['machine']['flags'])}), "
        f"{report['machine']['threads']} threads",
        "",
        "| competitor | streams | aggregate tok/s | vs 1 stream | vs llama.cpp | ITL p50 / p95 ms | TTFT mean s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rival = results.get(llamacpp.VARIANT, {})
    for name, rows in results.items():
        one = rows[min(rows)]["aggregate_decode_tok_s"]
        for level, row in rows.items():
            rate = row["aggregate_decode_tok_s"]
            versus = f"{rate / rival[level]['aggregate_decode_tok_s']:.2f}x" if level in rival else "-"
            lines.append(
                f"| {name} | {level} | {rate} | {rate / one:.2f}x | {versus} | "
                f"{row['itl_p50_ms']} / {row['itl_p95_ms']} | {row['ttft_mean_s']} |"
            )
    return "\n".join(lines)
