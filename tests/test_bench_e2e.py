"""The benchmark runs end to end and reports what it promises (a smoke test: no speed is asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_bench_writes_json_and_a_ratio_table(cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "q8chat",
            "bench",
            "--variants",
            "hf-fp32,q8chat-int8-dynamic-eager,q8chat-served-eager@kv-fp32",  # the server takes --kv-cache-dtype
            "--prompt-tokens",
            "48",
            "--decode-tokens",
            "8",
            "--new-tokens",
            "8",
            "--reps",
            "1",
            "--cache-dir",
            str(cache_dir),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"hf-fp32", "q8chat-int8-dynamic-eager", "q8chat-served-eager@kv-fp32"}
    assert rows["q8chat-int8-dynamic-eager"]["weight_mb"] < 0.3 * rows["hf-fp32"]["weight_mb"]
    served = rows["q8chat-served-eager@kv-fp32"]  # through HTTP: start-up, memory and prefix reuse are measured
    assert served["first_start_s"] > 0 and served["restart_s"] > 0 and served["rss_mb"] > served["weight_mb"]
    assert 0 < served["second_turn_cached_tokens"] < served["second_turn_prompt_tokens"]
    assert served["first_turn_cached_tokens"] < 10  # a new conversation: only the template's first tokens
    assert all(r["decode_tok_s"] > 0 and 0 < r["roofline_fraction"] and r["ttft_s"] > 0 for r in rows.values())
    assert report["machine"]["bandwidth_gb_s"] > 0
    assert "| q8chat-int8-dynamic-eager |" in result.stdout
    assert "q8chat-served-eager@kv-fp32: first start" in result.stdout
