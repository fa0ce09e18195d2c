"""``q8chat bench``: decode speed, time to first token and memory of float vs INT8, measured in one run.

Variants run interleaved (rep 1 of every variant, then rep 2, ...) and report medians, so a noisy
shared machine slows them alike; results are ratios against the baselines of the same run and
fractions of the memory-bandwidth roofline (bandwidth / weight bytes read per token). Every variant is
driven by the same engine loop (server/engine.py), so differences are the model's and the decoder's:
Hugging Face eager for the float baselines (what Q8-Chat compared against), and for INT8 the decoder
the server uses (compiled unless the variant ends in ``-eager``).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prompts import heldout_text
from quant.checkpoint import weight_bytes
from quant.load import load_float_model
from quant.smoothquant import Recipe
from quant.store import load_int8_model
from server.decoder import HFDecoder, make_decoder
from server.engine import Engine
from server.sampling import SamplingParams
from server.settings import default_cache_dir


@dataclass
class Result:
    variant: str
    weight_mb: float
    decode_tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)           # prompt of --prompt-tokens, empty cache
    second_turn_ttft_s: list[float] = field(default_factory=list)  # history reused, --new-tokens new

    def summary(self) -> dict:
        return {"variant": self.variant, "weight_mb": round(self.weight_mb, 1),
                "decode_tok_s": round(statistics.median(self.decode_tok_s), 2),
                "ttft_s": round(statistics.median(self.ttft_s), 4),
                "second_turn_ttft_s": round(statistics.median(self.second_turn_ttft_s), 4)}


def memory_bandwidth_gb_s(size_bytes: int = 1 << 30, reps: int = 7) -> float:
    """Read bandwidth: the best of several sums over a buffer far larger than the caches."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


def measure(engine: Engine, prompt: list[int], decode_tokens: int, new_tokens: int, result: Result) -> None:
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    engine.reset()  # a cold start for the first turn
    start = time.perf_counter()
    times, text = [], []
    for step in engine.generate(prompt, params):
        times.append(time.perf_counter())
        text.append(step.text)
    result.ttft_s.append(times[0] - start)
    result.decode_tok_s.append((len(times) - 1) / (times[-1] - times[0]))
    history = prompt + engine.tokenizer("".join(text), add_special_tokens=False).input_ids
    follow_up = history + prompt[:new_tokens]
    start = time.perf_counter()
    next(iter(engine.generate(follow_up, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))))
    result.second_turn_ttft_s.append(time.perf_counter() - start)


def variants(model_spec: str, cache_dir: Path, names: list[str], calib_samples: int, context: int):
    """(name, decoder, tokenizer, weight bytes) for each requested variant, built from one float model."""
    float_model = load_float_model(model_spec)
    for name in names:
        if name in ("hf-fp32", "hf-bf16"):
            model = float_model.model if name == "hf-fp32" else copy.deepcopy(float_model.model).to(torch.bfloat16)
            yield name, HFDecoder(model), float_model.tokenizer, weight_bytes(model)
        elif name.startswith("q8chat-int8-"):
            scheme = name.removeprefix("q8chat-int8-").removesuffix("-eager")
            quantized = load_int8_model(model_spec, Recipe(scheme=scheme, calib_samples=calib_samples), cache_dir)
            decoder = make_decoder(quantized.model, context, compile=not name.endswith("-eager"))
            yield name, decoder, quantized.tokenizer, weight_bytes(quantized.model)
        else:
            raise ValueError(f"unknown variant {name!r}")


def run(args) -> dict:
    torch.manual_seed(0)
    context = args.prompt_tokens * 2 + args.decode_tokens + 64
    loaded = list(variants(args.model, args.cache_dir, args.variants.split(","), args.calib_samples, context))
    tokenizer = loaded[0][2]
    prompt = tokenizer(heldout_text(), add_special_tokens=False).input_ids[:args.prompt_tokens]
    engines = {name: Engine(decoder, tok, context, set()) for name, decoder, tok, _ in loaded}
    results = {name: Result(name, size / 1e6) for name, _, _, size in loaded}
    for name, engine in engines.items():  # warm-up: first calls allocate and pick kernels
        measure(engine, prompt[:64], 4, 8, Result(name, 0))
    for rep in range(args.reps):
        for name, engine in engines.items():
            measure(engine, prompt, args.decode_tokens, args.new_tokens, results[name])
            print(f"rep {rep + 1}/{args.reps} {name}: {results[name].decode_tok_s[-1]:.1f} tok/s, "
                  f"TTFT {results[name].ttft_s[-1]:.3f} s", flush=True)
    bandwidth = memory_bandwidth_gb_s()
    rows = [r.summary() for r in results.values()]
    for row in rows:
        row["roofline_tok_s"] = round(bandwidth * 1e3 / row["weight_mb"], 1)
        row["roofline_fraction"] = round(row["decode_tok_s"] / row["roofline_tok_s"], 3)
    return {"machine": {"threads": torch.get_num_threads(), "bandwidth_gb_s": round(bandwidth, 1),
                        "isa": torch.backends.cpu.get_cpu_capability()},
            "workload": {"model": args.model, "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens,
                         "second_turn_new_tokens": args.new_tokens, "reps": args.reps},
            "results": rows}


def markdown(report: dict, baseline: str = "hf-bf16") -> str:
    rows = {r["variant"]: r for r in report["results"]}
    base = rows.get(baseline) or next(iter(rows.values()))
    lines = [f"Memory bandwidth {report['machine']['bandwidth_gb_s']} GB/s, {report['machine']['threads']} threads; "
             f"prompt {report['workload']['prompt_tokens']} tokens, {report['workload']['decode_tokens']} decoded, "
             f"median of {report['workload']['reps']}.", "",
             f"| variant | weights MB | decode tok/s | × {base['variant']} | roofline tok/s | of roofline "
             f"| TTFT s | 2nd-turn TTFT s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows.values():
        lines.append(f"| {r['variant']} | {r['weight_mb']} | {r['decode_tok_s']} | "
                     f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['roofline_tok_s']} | "
                     f"{100 * r['roofline_fraction']:.0f}% | {r['ttft_s']} | {r['second_turn_ttft_s']} |")
    return "\n".join(lines)


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode speed and time to first token, float vs INT8, as ratios")
    p.add_argument("--model", default="default")
    p.add_argument("--variants", default="hf-fp32,hf-bf16,q8chat-int8-dynamic,q8chat-int8-static",
                   help="comma-separated; q8chat-int8-SCHEME[-eager]: compiled unless -eager")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens of the second turn")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="INT8 checkpoints (as serve uses)")
    p.add_argument("--calib-samples", type=int, default=Recipe.calib_samples)
    p.add_argument("--json", type=Path, default=Path("bench-results.json"))
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    report = run(args)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0
