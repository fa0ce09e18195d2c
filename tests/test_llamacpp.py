"""The llama.cpp competitor of the benchmark: its decoder adapter keeps positions the way the engine
expects. llama-cpp-python is an optional extra (a 10-minute source build): without it these skip."""

import pytest
import torch

from bench import llamacpp
from quant.load import default_model_path

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason=f"llama-cpp-python absent: {llamacpp.INSTALL_HINT}")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = llamacpp.q8_0_gguf(default_model_path(), tmp_path_factory.mktemp("llamacpp"), threads=2)
    assert llamacpp.tensor_bytes(path) < 0.3 * 4 * 135e6  # Q8_0: about a byte per weight
    return llamacpp.LlamaCppDecoder(path, context=256, threads=2)


def test_reusing_a_prefix_gives_the_logits_of_a_fresh_prompt(decoder, tokenizer):
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", add_special_tokens=False).input_ids
    fresh = decoder.forward(ids, 0)
    decoder.forward(ids[:4] + [0, 0, 0], 0)  # a different continuation that must be dropped
    reused = decoder.forward(ids[4:], 4)
    assert torch.allclose(fresh, reused, atol=1e-3)
    assert tokenizer.decode([int(fresh.argmax())]).strip() == "Rome"
