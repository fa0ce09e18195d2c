"""End to end: ``q8chat quantize`` and ``q8chat eval`` on the real default model, as a user runs them. A fixed
alpha keeps them short: the per-layer alpha search runs in the default recipe, which the e2e servers quantize
with (tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quant.kernels import EAGER_OPS, eager_kernel
from quant.load import load_float_model
from quant.smoothquant import linear_names
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def q8chat(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "q8chat", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def float_model():
    """What the default model is: its linears and its float32 size, to compare the INT8 results with."""
    model = load_float_model("default").model
    return {"linears": len(linear_names(model)), "float32_bytes": 4 * sum(p.numel() for p in model.parameters())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-int8"
    args = ["--alpha", "0.5", "--scheme", "static", "--calib-samples", "8", "--calib-length", "256", "--no-gptq"]
    result = q8chat("quantize", "--model", "default", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantizing: 100%" in result.stderr and " 30/30 [" in result.stderr  # progress by layer, with an ETA
    return out


def test_quantize_writes_a_small_complete_checkpoint(checkpoint, float_model):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["recipe"]["scheme"] == "static" and manifest["recipe"]["alpha"] == 0.5
    assert manifest["recipe"]["gptq"] is False
    assert len(manifest["alphas"]) == float_model["linears"] and manifest["source"]["fingerprint"]
    assert set(manifest["fallback"]) <= set(manifest["alphas"])
    assert {"torch", "transformers"} <= set(manifest["versions"])
    weights = (checkpoint / "model.safetensors").stat().st_size
    assert weights <= 0.30 * float_model["float32_bytes"], f"{weights / float_model['float32_bytes']:.1%} of float32"


def test_quantize_refuses_a_non_empty_directory(checkpoint):
    result = q8chat("quantize", "--out", str(checkpoint))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"q8chat quantize: error: {checkpoint}: exists and is not empty (use --force to overwrite)"
    )


def test_bad_model_path_is_one_clear_line(tmp_path):
    result = q8chat("quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"q8chat quantize: error: {tmp_path / 'missing'}: no such file or directory"


def test_eval_compares_variants_and_shows_int8_kernels(tmp_path, float_model):
    report = tmp_path / "eval.json"
    args = ["--limit", "20", "--ppl-tokens", "2048", "--calib-samples", "8", "--json", str(report)]
    result = q8chat("eval", "--model", "default", "--compare", "float,naive,sq0.5", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert [r["name"] for r in rows] == ["float", "naive (dynamic)", "sq0.5 (dynamic)"]
    float_row, *int8_rows = rows
    for row in int8_rows:  # naive and sqALPHA: every linear W8A8, the LM head included
        assert row["fallback"] == [] and row["kernels"] == {EAGER_OPS[eager_kernel()]: float_model["linears"]}
        assert row["size_mb"] < 0.3 * float_row["size_mb"]
        assert row["perplexity"] < 1.1 * float_row["perplexity"]
    assert "| sq0.5 (dynamic) |" in result.stdout


def test_eval_of_a_saved_checkpoint_shows_its_fallback_layers_kernels(checkpoint, float_model, tmp_path):
    report = tmp_path / "eval.json"
    result = q8chat("eval", "--model", str(checkpoint), "--limit", "10", "--ppl-tokens", "1024", "--json", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| checkpoint (sq0.5-static) |" in result.stdout
    [row] = json.loads(report.read_text())
    # every linear runs an INT8 kernel: INT8 x INT8, or INT8 weights with BF16 activations (the reported
    # fallback layers, and the LM head by recipe). Without VNNI the INT8 x INT8 product runs in the weight-only
    # kernel too (quant.kernels), and the manifest's fallback list is what tells the two apart.
    w8a8, weight_only = EAGER_OPS[eager_kernel()], "aten::_weight_int8pack_mm"
    kernels = row["kernels"]
    assert sum(kernels.values()) == float_model["linears"] and set(kernels) <= {w8a8, weight_only}
    if w8a8 != weight_only:
        assert kernels.get(weight_only, 0) == len(row["fallback"]) + 1
