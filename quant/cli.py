"""``q8chat quantize`` and ``q8chat eval``: the command-line faces of the quantization tool."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from quant import defaults
from quant.checkpoint import CheckpointError, check_writable, is_checkpoint, save_checkpoint
from quant.evaluate import EvalDataError, evaluate_checkpoint, evaluate_variants, format_table
from quant.families import UnsupportedModel
from quant.int8 import SCHEMES
from quant.load import ModelLoadError, load_float_model
from quant.pipeline import quantize
from quant.smoothquant import DEFAULT_FALLBACK_ERROR, HEAD_SCHEMES, Recipe

log = logging.getLogger("q8chat")

USER_ERRORS = (ModelLoadError, CheckpointError, EvalDataError, UnsupportedModel, ValueError)


def parse_alpha(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be 'auto' or a number in [0, 1], not {text!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], not {alpha}")
    return alpha


def parse_fallback(text: str) -> float | None:
    return None if text == "none" else float(text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text}")
    return value


def configure_quantize(p: argparse.ArgumentParser) -> None:
    """``q8chat quantize``'s arguments."""
    p.description = (
        "Calibrate, smooth (fixed or per-layer auto alpha), convert to W8A8 INT8 and save a checkpoint "
        "that loads without calibration."
    )
    p.add_argument(
        "--model",
        default="default",
        help="HF directory, .gguf file, 'default' (SmolLM2-135M), or random:SHAPE (llama-1b, llama-7b, mpt-7b)",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (must be empty unless --force)")
    p.add_argument("--alpha", default="auto", type=parse_alpha, help="'auto' (per-layer search) or a value")
    p.add_argument(
        "--scheme",
        default="dynamic",
        choices=SCHEMES,
        help="activations: per-token dynamic, or per-tensor static (SmoothQuant-O3)",
    )
    p.add_argument("--calib-samples", default=defaults.CALIB_SAMPLES, type=positive_int, help="calibration sequences")
    p.add_argument(
        "--calib-length", default=defaults.CALIB_LENGTH, type=positive_int, help="tokens per calibration sequence"
    )
    p.add_argument(
        "--fallback-error",
        default=DEFAULT_FALLBACK_ERROR,
        type=parse_fallback,
        help="layers whose relative INT8 error exceeds this keep BF16 activations ('none': never)",
    )
    p.add_argument(
        "--head-scheme",
        default="weight_only",
        choices=HEAD_SCHEMES,
        help="LM head activations: BF16 (weight_only, default) or per-token INT8 (dynamic)",
    )
    p.add_argument("--no-smooth", action="store_true", help="naive W8A8 without smoothing (for comparison)")
    p.add_argument(
        "--no-gptq",
        action="store_true",
        help="round weights to nearest instead of by GPTQ: a 7B model quantizes in about half the time, a "
        "little less accurately (README's eval table)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(run=run_quantize)


def configure_eval(p: argparse.ArgumentParser) -> None:
    """``q8chat eval``'s arguments."""
    p.description = (
        "Compare variants on held-out text: perplexity, LAMBADA accuracy, size on disk, load time and "
        "the matmul kernels that run."
    )
    p.add_argument("--model", default="default", help="HF directory, .gguf file, 'default', or an INT8 checkpoint")
    p.add_argument(
        "--compare",
        default="float,naive,sq0.5,auto",
        help="variants: float, naive, sqALPHA, auto; ':static'/':dynamic' suffix picks the scheme",
    )
    p.add_argument("--scheme", default="dynamic", choices=SCHEMES, help="scheme for variants without a suffix")
    p.add_argument("--limit", default=1000, type=positive_int, help="LAMBADA examples")
    p.add_argument("--ppl-tokens", default=32768, type=positive_int, help="held-out tokens for perplexity")
    p.add_argument("--calib-samples", default=defaults.CALIB_SAMPLES, type=positive_int, help="calibration sequences")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(run=run_eval)


def run_quantize(args) -> int:
    recipe = Recipe(
        alpha=args.alpha,
        scheme=args.scheme,
        smooth=not args.no_smooth,
        gptq=not args.no_gptq,
        fallback_error=args.fallback_error,
        head_scheme=args.head_scheme,
        calib_samples=args.calib_samples,
        calib_length=args.calib_length,
    )
    out = args.out.expanduser()
    check_writable(out, args.force)
    quantized = quantize(load_float_model(args.model, lazy=True), recipe)
    save_checkpoint(quantized.model, quantized.tokenizer, out, quantized.manifest, force=args.force)
    fallback = quantized.manifest["fallback"]
    print(f"wrote {out} ({recipe.name}); layers with BF16 activations: {', '.join(fallback) if fallback else 'none'}")
    return 0


def run_eval(args) -> int:
    if is_checkpoint(args.model):
        results = [evaluate_checkpoint(Path(args.model), args.limit, args.ppl_tokens)]
    else:
        float_model = load_float_model(args.model)
        results = evaluate_variants(
            float_model,
            [v.strip() for v in args.compare.split(",") if v.strip()],
            scheme=args.scheme,
            limit=args.limit,
            ppl_tokens=args.ppl_tokens,
            calib_samples=args.calib_samples,
        )
    print(format_table(results))
    for r in results:
        if r.fallback:
            print(f"{r.name}: {len(r.fallback)} layers with BF16 activations: {', '.join(r.fallback)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0
