"""Where compiled steps are kept, and what a start does when one cannot be built."""

import logging

import torch

from quant.smoothquant import Recipe
from server.compiled_step import package_paths
from server.decoder import StaticDecoder, make_decoder
from tests.conftest import tiny_llama
from tests.test_checkpoint import quantized_tiny


def test_a_step_is_keyed_by_context_length_and_thread_count(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    first = package_paths(tmp_path, checkpoint, 256)
    assert set(first) == {"decode", "prefill"} and first["decode"].parent == tmp_path / "compiled"
    assert package_paths(tmp_path, checkpoint, 256) == first
    assert package_paths(tmp_path, checkpoint, 512)["decode"] != first["decode"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert package_paths(tmp_path, checkpoint, 256)["decode"] != first["decode"]
    finally:
        torch.set_num_threads(threads)


def test_a_failed_build_runs_eagerly_and_is_not_retried_at_the_next_start(tmp_path, tokenizer, caplog):
    """The static scheme is what fails for real (an inductor assertion while lowering, within seconds)."""
    model = tiny_llama(len(tokenizer))
    quantized_tiny(model, Recipe(alpha=None, scheme="static"))
    packages = {"decode": tmp_path / "compiled" / "decode-x"}
    with caplog.at_level(logging.INFO):
        decoder = make_decoder(lambda: model, model.config, 64, packages)
    assert isinstance(decoder, StaticDecoder) and decoder.description.startswith("eager")
    failed = tmp_path / "compiled" / "decode-x.failed"
    assert failed.is_file() and "compiling the decode step" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        decoder = make_decoder(lambda: model, model.config, 64, packages)
    assert decoder.description.startswith("eager") and "compiling the decode step" not in caplog.text
    assert f"failed to compile before ({failed.read_text().strip()}); delete {failed} to retry" in caplog.text
