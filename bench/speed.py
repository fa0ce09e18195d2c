"""``q8chat bench``: decode speed, time to first token and memory of float vs INT8, measured in one run.

Variants run interleaved (rep 1 of every variant, then rep 2, ...) and report medians, so a noisy
shared machine slows them alike; results are ratios against the baselines of the same run and
fractions of the memory-bandwidth roofline (bandwidth / weight bytes read per token). Every variant is
driven by the same engine loop (server/engine.py), so differences are the model's and the decoder's:
Hugging Face eager for the float baselines (what Q8-Chat compared against), for INT8 the decoder
the server uses (compiled unless the variant ends in ``-eager``), and llama.cpp on Q8_0 weights where
llama-cpp-python is installed (bench/llamacpp.py).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from bench import concurrency, concurrency_report, llamacpp, llamaserver
from bench.results import Result, Sample
from bench.served import SERVED_NAME, Served, served_args
from prompts import heldout_text
from quant import defaults
from quant.checkpoint import read_checkpoint_info, stored_weight_bytes, weight_bytes
from quant.kernels import check_kernel, cpu_class, default_kernels, kernels_by_step
from quant.load import DEFAULT_MODEL, load_float_model, resolve_model_path
from quant.smoothquant import Recipe
from quant.store import int8_checkpoint, load_int8_model
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.runtime.aoti.steps import package_paths
from server.runtime.compact import DEFAULT_KV_DTYPE, KV_DTYPES, kv_cache_bytes
from server.runtime.decoders import HFDecoder, make_decoder


def memory_bandwidth_gb_s(size_bytes: int = 1 << 30, reps: int = 7) -> float:
    """Read bandwidth: the fastest of several reads (a sum, a maximum) of a buffer far larger than the caches.
    On a Zen 4 EPYC the float sum alone read 10-15 % slower than a maximum over the same bytes."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        for read in (torch.sum, torch.amax):
            start = time.perf_counter()
            read(x)
            best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


class InProcess:
    """A decoder driven by the server's engine loop in this process (no HTTP)."""

    def __init__(self, decoder, tokenizer, context: int) -> None:
        self.tokenizer = tokenizer
        self.engine = Engine(decoder, tokenizer, context, set())

    def measure(self, prompt: list[int], decode_tokens: int, new_tokens: int) -> Sample:
        engine = self.engine
        engine.reset()  # a cold start for the first turn
        start = time.perf_counter()
        times, text = [], []
        for step in engine.generate(prompt, SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)):
            times.append(time.perf_counter())
            text.append(step.text)
        history = prompt + engine.tokenizer("".join(text), add_special_tokens=False).input_ids
        follow_up = history + prompt[:new_tokens]
        second = time.perf_counter()
        next(iter(engine.generate(follow_up, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))))
        return Sample(
            ttft_s=times[0] - start,
            decode_tok_s=(len(times) - 1) / (times[-1] - times[0]),
            second_turn_ttft_s=time.perf_counter() - second,
        )

    def figures(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


# q8chat-served-json: answers held to a JSON schema with no end in sight (a thousand records at least),
# so that every decode step pays the grammar's mask: records mix strings, integers, enums and structure.
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
JSON_RECORDS = {
    "type": "json_schema",
    "json_schema": {"name": "records", "schema": {"type": "array", "items": RECORD, "minItems": 1000}},
}


def variant_options(suffix: str) -> tuple[str | None, str | None]:
    """A q8chat variant's options after ``@``, joined by ``+``: a W8A8 kernel (``quant.kernels.KERNELS``) and a
    KV cache type (``kv-bf16``, ``kv-fp32``, ``kv-int8``). Returns (kernel, KV cache type), None where the
    server's default."""
    kernel = kv = None
    for option in filter(None, suffix.split("+")):
        if option.startswith("kv-") and option.removeprefix("kv-") in KV_DTYPES:
            kv = option.removeprefix("kv-")
        else:
            kernel = check_kernel(option)
    return kernel, kv


def variants(
    model_spec: str,
    cache_dir: Path,
    names: list[str],
    calib_samples: int,
    context: int,
    log_dir: Path,
    converter: Path | None,
):
    """(name, runner, weight bytes) for each requested variant, built from one float model."""
    float_model = load_float_model(model_spec, lazy=not any(name.startswith("hf-") for name in names))
    tokenizer = float_model.tokenizer
    for name in names:
        base, _, options = name.partition("@")  # q8chat variants may name options: ...@bf16+kv-fp32
        kernel, kv = variant_options(options)
        kv_dtype = KV_DTYPES[kv] if kv else DEFAULT_KV_DTYPE
        if name in ("hf-fp32", "hf-bf16"):
            model = float_model.model if name == "hf-fp32" else copy.deepcopy(float_model.model).to(torch.bfloat16)
            yield name, InProcess(HFDecoder(model), tokenizer, context), weight_bytes(model)
        elif base.startswith("q8chat-int8-"):
            scheme = base.removeprefix("q8chat-int8-").removesuffix("-eager")
            quantized = load_int8_model(model_spec, Recipe(scheme=scheme, calib_samples=calib_samples), cache_dir)
            kernels = kernels_by_step(kernel or None, stored_weight_bytes(quantized.path))
            compiled = not base.endswith("-eager")
            packages = package_paths(cache_dir, quantized.path, context, kernels, kv_dtype) if compiled else None
            config = quantized.model.config
            decoder = make_decoder(lambda: quantized.model, config, context, packages, kernels, kv_dtype)
            yield name, InProcess(decoder, tokenizer, context), weight_bytes(quantized.model)
        elif base in ("q8chat-served", "q8chat-served-eager", "q8chat-served-json"):
            checkpoint = read_checkpoint_info(
                int8_checkpoint(model_spec, Recipe(calib_samples=calib_samples), cache_dir)
            )
            args = served_args(checkpoint.path, cache_dir, context, not base.endswith("-eager"), kernel or "auto", kv)
            constrained = JSON_RECORDS if base.endswith("-json") else None
            served = Served(args, SERVED_NAME, tokenizer, log_dir, response_format=constrained)
            served.extra["kv_cache_mb"] = round(kv_cache_bytes(checkpoint.config, context, kv_dtype) / 1e6, 1)
            yield name, served, stored_weight_bytes(checkpoint.path)
        elif name in (llamacpp.VARIANT, llamaserver.NAME):
            threads = torch.get_num_threads()
            path = llamacpp.q8_0_gguf(resolve_model_path(model_spec), cache_dir, threads, converter)
            if name == llamacpp.VARIANT:
                runner = InProcess(llamacpp.LlamaCppDecoder(path, context, threads), tokenizer, context)
            else:  # its own HTTP server, one slot: the served competitor of q8chat-served
                command = [str(llamaserver.binary(cache_dir))]
                flags = llamaserver.server_args(path, context, 1, threads, SERVED_NAME)
                runner = Served(flags, SERVED_NAME, tokenizer, log_dir, command=command)
                runner.extra["kv_cache_mb"] = round(kv_cache_bytes(float_model.model.config, context) / 1e6, 1)
            yield name, runner, llamacpp.tensor_bytes(path)
        else:
            raise ValueError(f"unknown variant {name!r}")


def measure_all(loaded: list, args) -> dict[str, Result]:
    """Every variant, rep by rep (interleaved), after a warm-up call each; then each runner's own figures."""
    prompt = loaded[0][1].tokenizer(heldout_text(), add_special_tokens=False).input_ids[: args.prompt_tokens]
    results = {name: Result(name, size / 1e6) for name, _, size in loaded}
    for _, runner, _ in loaded:  # warm-up: first calls allocate and pick kernels
        runner.measure(prompt[:64], 4, 8)
    for rep in range(args.reps):
        for name, runner, _ in loaded:
            sample = runner.measure(prompt, args.decode_tokens, args.new_tokens)
            results[name].samples.append(sample)
            print(
                f"rep {rep + 1}/{args.reps} {name}: {sample.decode_tok_s:.1f} tok/s, TTFT {sample.ttft_s:.3f} s",
                flush=True,
            )
    for name, runner, _ in loaded:
        results[name].extra.update(runner.figures())
    return results


def run(args) -> dict:
    torch.manual_seed(0)
    context = args.prompt_tokens * 2 + args.decode_tokens + 64
    log_dir = Path(tempfile.mkdtemp(prefix="q8chat-bench-"))
    model = args.model if args.model == DEFAULT_MODEL else str(resolve_model_path(args.model, args.cache_dir))
    loaded = []
    try:  # served variants run a server process: stop it whatever fails
        for variant in variants(
            model,
            args.cache_dir,
            args.variants.split(","),
            args.calib_samples,
            context,
            log_dir,
            args.llama_cpp_converter,
        ):
            loaded.append(variant)
        results = measure_all(loaded, args)
    finally:
        for _, runner, _ in loaded:
            runner.stop()
    bandwidth = memory_bandwidth_gb_s()
    int8_bytes = max((size for name, _, size in loaded if name.startswith("q8chat-")), default=0)
    rows = [r.summary() for r in results.values()]
    for row in rows:
        row["roofline_tok_s"] = round(bandwidth * 1e3 / row["weight_mb"], 1)
        row["roofline_fraction"] = round(row["decode_tok_s"] / row["roofline_tok_s"], 3)
    return {
        "machine": {
            "threads": torch.get_num_threads(),
            "bandwidth_gb_s": round(bandwidth, 1),
            "isa": torch.backends.cpu.get_cpu_capability(),
            **cpu_class(),
            "default_int8_kernels": default_kernels(weight_bytes=int8_bytes),  # this model's
        },
        "workload": {
            "model": args.model,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "second_turn_new_tokens": args.new_tokens,
            "reps": args.reps,
            "server_logs": str(log_dir),
        },
        "results": rows,
    }


def markdown(report: dict, baselines: tuple[str, ...] = ("hf-bf16", llamacpp.VARIANT, llamaserver.NAME)) -> str:
    """The results as a table of ratios against each baseline present, time to first token against the
    competitor measured the same way (a served variant against a served one), and the served variants'
    start-up and memory figures."""
    rows = {r["variant"]: r for r in report["results"]}
    bases = [rows[name] for name in baselines if name in rows] or [next(iter(rows.values()))]

    def ttft_base(row: dict) -> dict:
        served = "rss_mb" in row
        alike = [b for b in bases if ("rss_mb" in b) == served]
        return (alike or bases)[-1]

    machine = report["machine"]
    lines = [
        f"CPU {machine['model_name']} ({' '.join(machine['flags'])}), W8A8 kernels by default "
        f"{', '.join(f'{kernel} {step}' for step, kernel in machine['default_int8_kernels'].items())}. "
        f"Memory bandwidth {machine['bandwidth_gb_s']} GB/s, {machine['threads']} threads; "
        f"prompt {report['workload']['prompt_tokens']} tokens, {report['workload']['decode_tokens']} decoded, "
        f"median of {report['workload']['reps']}.",
        "",
        "| variant | weights MB | decode tok/s | "
        + " | ".join(f"× {b['variant']}" for b in bases)
        + " | of roofline | TTFT s | × TTFT of | 2nd-turn TTFT s |",
        "| --- |" + " ---: |" * (6 + len(bases)),
    ]
    for r in rows.values():
        ratios = " | ".join(f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}" for b in bases)
        base = ttft_base(r)
        lines.append(
            f"| {r['variant']} | {r['weight_mb']} | {r['decode_tok_s']:.1f} | {ratios} | "
            f"{100 * r['roofline_fraction']:.0f}% | {r['ttft_s']:.3f} | {r['ttft_s'] / base['ttft_s']:.2f} "
            f"({base['variant']}) | {r['second_turn_ttft_s']:.3f} |"
        )
    for r in rows.values():
        if "rss_mb" in r:
            budget = r["weight_mb"] + r["kv_cache_mb"]
            lines.append(
                f"\n{r['variant']}: first start {r['first_start_s']} s, restart {r['restart_s']} s; "
                f"resident {r['rss_mb']} MB (peak {r['peak_rss_mb']}) = {r['rss_mb'] / budget:.2f}× "
                f"weights + KV cache ({budget:.1f} MB); prompt {r['prompt_tokens']} tokens, second turn "
                f"{r['second_turn_cached_tokens']} of {r['second_turn_prompt_tokens']} cached."
            )
    if "q8chat-served" in rows and "q8chat-served-json" in rows:
        free, held = rows["q8chat-served"]["decode_tok_s"], rows["q8chat-served-json"]["decode_tok_s"]
        lines.append(
            f"\nConstrained decoding (JSON schema): {1e3 / held - 1e3 / free:+.2f} ms a token, "
            f"{100 * (free / held - 1):+.1f} % of the unconstrained decode time."
        )
    return "\n".join(lines)


def default_variants() -> list[str]:
    names = ["hf-fp32", "hf-bf16", "q8chat-int8-dynamic", "q8chat-int8-static", "q8chat-served"]
    return names + [llamacpp.VARIANT] if llamacpp.available() else names


USER_ERRORS = (llamacpp.LlamaCppUnavailable,)


def configure_bench(p) -> None:
    """``q8chat bench``'s arguments."""
    p.add_argument(
        "--model",
        default="default",
        help="as for serve (random:llama-1b, random:llama-7b, random:mpt-7b: real shapes with random weights)",
    )
    p.add_argument(
        "--variants",
        default=",".join(default_variants()),
        help=f"comma-separated; q8chat-int8-SCHEME[-eager]: in-process, compiled unless -eager; "
        "q8chat-served[-eager]: q8chat serve over HTTP, with start-up time and memory; q8chat-served-json: "
        "the same, answers held to a JSON schema (constrained decoding's cost); a q8chat "
        "variant@OPTIONS takes options joined by '+': a W8A8 kernel (s8s8, u8s8, bf16) forces that kernel, "
        "kv-fp32, kv-bf16 or kv-int8 the KV cache's type (q8chat-int8-dynamic@u8s8+kv-fp32); "
        f"{llamacpp.VARIANT}: llama.cpp on the model as Q8_0 (a default when llama-cpp-python is "
        f"installed); {llamaserver.NAME}: the same over HTTP, llama.cpp's own server (built here with cmake)",
    )
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens of the second turn")
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions of each variant; with --concurrency, rounds of every level for every competitor "
        "(ratios taken within each round, medians reported)",
    )
    p.add_argument("--cache-dir", type=Path, default=defaults.CACHE_DIR, help="INT8 checkpoints (as serve uses)")
    p.add_argument("--calib-samples", type=int, default=defaults.CALIB_SAMPLES)
    p.add_argument(
        "--llama-cpp-converter",
        type=Path,
        default=None,
        help="llama.cpp's convert_hf_to_gguf.py, for the llama.cpp variant of a non-GGUF model",
    )
    p.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated stream counts (1,2,4,8): measure many users at once instead of the variants "
        "(aggregate decode, inter-token latency, time to first token; q8chat served with --max-batch the "
        "largest beside llama.cpp's server with as many slots, built here with cmake, and both in process), "
        "then how much of two users' alternating chats the server finds cached",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=sorted(KV_DTYPES),
        default=None,
        help="with --concurrency: q8chat's KV cache type, served and in process (default: serve's)",
    )
    p.add_argument("--json", type=Path, default=Path("bench-results.json"))
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    report = concurrency.run(args) if args.concurrency else run(args)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(concurrency_report.markdown(report) if args.concurrency else markdown(report))
    return 0
