"""Settings: one source of defaults for CLI flags and Q8CHAT_* variables."""

import argparse
import subprocess
import sys

from server.settings import Settings


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("Q8CHAT_MAX_QUEUE", "3")
    monkeypatch.setenv("Q8CHAT_API_KEY", "k1, k2")
    s = Settings.from_args(["--port", "9000", "--template", "vicuna", "--cors-origins", "http://a.example"])
    assert (s.port, s.max_queue, s.template) == (9000, 3, "vicuna")
    assert s.api_key == ["k1", "k2"] and s.cors_origins == ["http://a.example"]
    assert Settings.from_args(["--api-key", "x", "--api-key", "y"]).api_key == ["x", "y"]


def test_defaults_listen_on_loopback_only(monkeypatch):
    for var in ("Q8CHAT_HOST", "Q8CHAT_API_KEY", "Q8CHAT_CORS_ORIGINS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.from_args([])
    assert s.host == "127.0.0.1" and s.api_key == [] and s.cors_origins == []


def test_a_bad_flag_stops_q8chat_serve_before_it_starts_anything():
    """--alpha was parsed only after the HTTP server was up and the model was loading."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "--alpha", "1.5", "--port", "1"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr.strip() == "q8chat serve: error: --alpha: Input should be 'auto', or Input should be less "
        "than or equal to 1"
    )
    assert Settings.from_args(["--alpha", "0.5"]).alpha == 0.5 and Settings.from_args([]).alpha == "auto"


def test_the_recipe_has_one_set_of_defaults_for_serve_quantize_and_the_library():
    from quant.cli import configure_quantize
    from quant.smoothquant import Recipe

    parser = argparse.ArgumentParser()
    configure_quantize(parser)
    cli = parser.parse_args(["--out", "x"])
    assert Settings.from_args([]).calib_samples == cli.calib_samples == Recipe().calib_samples
    assert cli.calib_length == Recipe().calib_length
