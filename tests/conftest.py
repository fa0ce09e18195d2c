"""Shared fixtures: the real default tokenizer, tiny random Llama/MPT models, and the real server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.served import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
Q8CHAT_SERVE = (str(Path(sys.executable).parent / "q8chat"), "serve")  # what `make serve` runs


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    from quant.load import default_model_path
    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_mpt(vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, MptConfig
    torch.manual_seed(seed)
    config = MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=vocab_size, max_seq_len=256,
                       eos_token_id=2, bos_token_id=1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=["llama", "mpt"])
def tiny_model(request, tokenizer):
    build = {"llama": tiny_llama, "mpt": tiny_mpt}[request.param]
    return build(len(tokenizer))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Quantized checkpoints shared by the tests of one session (the first server start quantizes)."""
    return tmp_path_factory.mktemp("q8chat-cache")


@pytest.fixture(scope="session")
def start_server(cache_dir, tmp_path_factory):
    """Start real servers on the default INT8 model, quantized by the default recipe once per session into
    ``cache_dir`` (as `make serve` does at its first start)."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True, launcher: list[str] = (),
              command: tuple[str, ...] = (sys.executable, "-m", "server")) -> ServerProcess:
        # eager decoding unless a test asks for --compile: compiling takes minutes per model
        proc = ServerProcess(list(args), {"Q8CHAT_CACHE_DIR": str(cache_dir), "Q8CHAT_COMPILE": "false",
                                          **(env or {})},
                             tmp_path_factory.mktemp("logs") / "server.log", launcher, command)
        started.append(proc)
        if wait:
            proc.wait_ready(timeout=1800)  # the first start quantizes (minutes), a compiled one compiles too
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.stop()


@pytest.fixture(scope="session")
def server(start_server):
    return start_server("--max-queue", "2", "--keepalive-s", "0.5")
