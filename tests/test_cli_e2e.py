"""End to end: ``q8chat quantize`` and ``q8chat eval`` on the real default model, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quant.kernels import EAGER_OPS, eager_kernel
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def q8chat(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "q8chat", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-int8"
    result = q8chat(
        "quantize",
        "--model",
        "default",
        "--out",
        str(out),
        "--alpha",
        "auto",
        "--scheme",
        "static",
        "--calib-samples",
        "8",
        "--calib-length",
        "256",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibrating" in result.stderr and "alpha search" in result.stderr  # progress bars
    return out


def test_quantize_writes_a_small_complete_checkpoint(checkpoint):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["recipe"]["scheme"] == "static" and manifest["recipe"]["alpha"] is None
    assert len(manifest["alphas"]) == 30 * 7 + 1 and manifest["source"]["fingerprint"]  # blocks + LM head
    assert set(manifest["fallback"]) <= set(manifest["alphas"])
    assert {"torch", "transformers"} <= set(manifest["versions"])
    weights = (checkpoint / "model.safetensors").stat().st_size
    float32_bytes = 134_515_008 * 4  # SmolLM2-135M parameters in float32
    assert weights <= 0.30 * float32_bytes, f"{weights / float32_bytes:.1%} of float32"


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


def test_eval_compares_variants_and_shows_int8_kernels(tmp_path):
    report = tmp_path / "eval.json"
    result = q8chat(
        "eval",
        "--model",
        "default",
        "--compare",
        "float,naive,auto",
        "--limit",
        "20",
        "--ppl-tokens",
        "2048",
        "--calib-samples",
        "8",
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert [r["name"] for r in rows] == ["float", "naive (dynamic)", "auto (dynamic)"]
    float_row, naive_row, auto_row = rows
    # every linear runs an INT8 kernel: INT8 x INT8, or INT8 weights with BF16 activations (the reported
    # fallback layers, and the LM head by recipe). Without VNNI the INT8 x INT8 product runs in the weight-only
    # kernel too (quant.kernels), and the manifest's fallback list is what tells the two apart.
    w8a8, weight_only = EAGER_OPS[eager_kernel()], "aten::_weight_int8pack_mm"
    assert naive_row["fallback"] == [] and set(naive_row["kernels"]) == {w8a8}  # all W8A8
    kernels = auto_row["kernels"]
    assert sum(kernels.values()) == 30 * 7 + 1 and set(kernels) <= {w8a8, weight_only}
    if w8a8 != weight_only:
        assert kernels[w8a8] > 0.8 * (30 * 7 + 1)
        assert len(auto_row["fallback"]) + 1 == kernels.get(weight_only, 0)
    assert auto_row["size_mb"] < 0.3 * float_row["size_mb"]
    assert auto_row["perplexity"] < 1.1 * float_row["perplexity"]
    assert "| auto (dynamic) |" in result.stdout


def test_eval_of_a_saved_checkpoint(checkpoint):
    result = q8chat("eval", "--model", str(checkpoint), "--limit", "10", "--ppl-tokens", "1024")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| checkpoint (auto-static) |" in result.stdout
