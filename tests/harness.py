"""What the tests build: tiny random Llama and MPT models, quantized and saved as checkpoints a real server can
serve, and a fake engine for the layers above the engine. (Servers are started with ``bench.served.ServerProcess``:
the benchmark measures a served process the same way.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import torch

from quant.calibrate import collect_activation_stats
from quant.checkpoint import save_checkpoint
from quant.smoothquant import Recipe, linear_names, quantize_model
from server.engine.engine import ContextLengthExceeded, StepOutput


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, head_dim: int = 16):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_mpt(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM, MptConfig

    torch.manual_seed(seed)
    config = MptConfig(
        d_model=64,
        n_heads=4,
        n_layers=layers,
        expansion_ratio=2,
        vocab_size=vocab_size,
        max_seq_len=256,
        eos_token_id=2,
        bos_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def quantized_tiny(model, recipe=Recipe(alpha=None)):
    batches = [torch.randint(0, 2000, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    stats = collect_activation_stats(model, linear_names(model), batches, progress=False)
    report = quantize_model(model, stats, recipe, progress=False)
    return {"name": "tiny", "recipe": recipe.to_dict(), "alphas": report.alphas(), "fallback": report.fallback}


def tiny_checkpoint(tokenizer, directory: Path, recipe: Recipe = Recipe(alpha=None), head_dim: int = 16) -> Path:
    """A tiny random Llama (four heads of ``head_dim``), quantized and saved as an INT8 checkpoint named "tiny"
    (with the default model's tokenizer): a server on it starts in seconds and decodes thousands of tokens a
    second."""
    model = tiny_llama(len(tokenizer), head_dim=head_dim)
    return save_checkpoint(model, tokenizer, directory, quantized_tiny(model, recipe))


class FakeEngine:
    """Emits the words of ``reply`` one per step (``step_s`` each), honouring max_tokens, on ``slots`` slots;
    the batcher drives it as it drives the real engine."""

    def __init__(self, reply="Hello there friend", step_s=0.0, context_length=100, slots=1):
        self.words = reply.split(" ")
        self.step_s = step_s
        self.context_length = context_length
        self.slots = slots
        self.prefix_cache = None
        self.steps_run = 0
        self.running = threading.Event()

    def check_length(self, prompt_tokens, max_tokens):
        if prompt_tokens + (max_tokens or 0) > self.context_length:
            raise ContextLengthExceeded("too long")

    def pick_slot(self, prompt_ids, free):
        return free[0]

    def begin(self, prompt_ids, params, stats, slot=0, matcher=None, logprobs=None):
        stats.prompt_tokens = len(prompt_ids)
        self.running.set()
        return FakeSequence(self.words, params, stats)

    def decode(self, sequences):
        time.sleep(self.step_s)
        self.steps_run += 1
        return [None] * len(sequences)


class FakeSequence:
    prefilling = False

    def __init__(self, words, params, stats):
        self.words, self.params, self.stats = words, params, stats

    def take(self, row) -> StepOutput:
        i = self.stats.completion_tokens
        self.stats.completion_tokens = i + 1
        last = i == len(self.words) - 1 or i + 1 == self.params.max_tokens
        finish = ("stop" if i == len(self.words) - 1 else "length") if last else None
        return StepOutput(("" if i == 0 else " ") + self.words[i], finish)


def health_during(server, run) -> tuple[float, list[float]]:
    """Seconds ``run()`` took, and how long each /health request took meanwhile (polled every 20 ms): the
    event loop must answer while a long job runs off it."""
    latencies, done = [], threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                begin = time.perf_counter()
                assert client.get(server.base_url + "/health").status_code == 200
                latencies.append(time.perf_counter() - begin)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    begin = time.perf_counter()
    poller.start()
    try:
        run()
    finally:
        done.set()
        poller.join()
    return time.perf_counter() - begin, latencies
