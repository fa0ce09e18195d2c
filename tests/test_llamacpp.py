"""The llama.cpp competitor of the benchmark: its decoder adapter keeps positions the way the engine
expects. llama-cpp-python is an optional extra (a 10-minute source build): without it these skip."""

import pytest
import torch

from bench import llamacpp
from quant.load import default_model_path, load_float_model

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason=f"llama-cpp-python absent: {llamacpp.INSTALL_HINT}")


@pytest.fixture(scope="module")
def float_model():
    return load_float_model("default").model


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, float_model):
    path = llamacpp.q8_0_gguf(default_model_path(), tmp_path_factory.mktemp("llamacpp"), threads=2)
    weights = sum(p.numel() for p in float_model.parameters())
    assert llamacpp.tensor_bytes(path) < 1.2 * weights  # Q8_0: a byte per weight and a scale per 32
    return llamacpp.LlamaCppDecoder(path, context=256, threads=2)


def test_reusing_a_prefix_gives_the_logits_of_a_fresh_prompt(decoder, tokenizer, float_model):
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", add_special_tokens=False).input_ids
    fresh = decoder.forward(ids, 0)
    decoder.forward(ids[:4] + [0, 0, 0], 0)  # a different continuation that must be dropped
    reused = decoder.forward(ids[4:], 4)
    assert torch.allclose(fresh, reused, atol=1e-3)
    with torch.no_grad():  # Q8_0 predicts the float model's token
        assert int(fresh.argmax()) == int(float_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
