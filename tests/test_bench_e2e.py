"""The benchmark runs end to end and reports what it promises (a smoke test: no speed is asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import E2E_CALIB_SAMPLES, ROOT

pytestmark = pytest.mark.e2e


def test_bench_writes_json_and_a_ratio_table(cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "--variants", "hf-fp32,q8chat-int8-dynamic-eager",
         "--prompt-tokens", "48", "--decode-tokens", "8", "--new-tokens", "8", "--reps", "1",
         "--cache-dir", str(cache_dir), "--calib-samples", str(E2E_CALIB_SAMPLES), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"hf-fp32", "q8chat-int8-dynamic-eager"}
    assert rows["q8chat-int8-dynamic-eager"]["weight_mb"] < 0.3 * rows["hf-fp32"]["weight_mb"]
    assert all(r["decode_tok_s"] > 0 and 0 < r["roofline_fraction"] and r["ttft_s"] > 0 for r in rows.values())
    assert report["machine"]["bandwidth_gb_s"] > 0
    assert "| q8chat-int8-dynamic-eager |" in result.stdout
