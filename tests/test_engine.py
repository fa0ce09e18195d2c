"""The engine on tiny random models, with each decoder: prefix reuse is exact, limits and cancellation hold."""

import pytest
import torch

from server.engine.engine import ContextLengthExceeded, Engine, GenerationStats
from server.engine.sampling import SamplingParams
from server.runtime.decoders import HFDecoder, StaticDecoder, make_decoder
from server.runtime.static_llama import UnsupportedForCompile, check_supported

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(params=["hf", "static"])
def make_engine(request, tiny_model, tokenizer):
    def make(context=256, eos=frozenset()):
        if request.param == "hf":
            decoder = HFDecoder(tiny_model)
        else:
            try:
                check_supported(tiny_model.config)
            except UnsupportedForCompile:
                pytest.skip("no compact decoder for this family")
            decoder = make_decoder(lambda: tiny_model, tiny_model.config, context)
            assert isinstance(decoder, StaticDecoder)
        return Engine(decoder, tokenizer, context, set(eos))

    return make


def run(engine, prompt, params=GREEDY, **kwargs):
    stats = GenerationStats()
    steps = list(engine.generate(prompt, params, stats, **kwargs))
    return steps, stats


def test_reused_prefix_gives_the_same_tokens_as_a_fresh_cache(make_engine):
    prompt = torch.randint(0, 2000, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    follow_up = prompt + torch.randint(0, 2000, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    warm = make_engine()
    run(warm, prompt)
    steps, stats = run(warm, follow_up)
    assert stats.cached_tokens == 30 and stats.prompt_tokens == 39
    fresh_steps, fresh_stats = run(make_engine(), follow_up)
    assert fresh_stats.cached_tokens == 0
    assert [s.text for s in steps] == [s.text for s in fresh_steps]
    # a diverging prompt reuses only the common part, and a repeat reuses all but the last token
    diverged = prompt[:10] + [5, 6, 7]
    assert run(warm, diverged)[1].cached_tokens == 10
    assert run(warm, diverged)[1].cached_tokens == len(diverged) - 1


def test_length_limits(make_engine):
    engine = make_engine(context=40)
    steps, stats = run(engine, list(range(100, 135)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert stats.completion_tokens == 5 and steps[-1].finish_reason == "length"  # context is full
    with pytest.raises(ContextLengthExceeded):
        run(engine, list(range(100, 140)))
    with pytest.raises(ContextLengthExceeded):
        engine.check_length(30, 20)


@torch.no_grad()
def test_eos_stops_unless_ignored(tiny_model, make_engine):
    prompt = list(range(200, 210))
    first = int(tiny_model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    engine = make_engine(eos={first})  # make the greedy next token the EOS
    steps, stats = run(engine, prompt, SamplingParams(max_tokens=5, temperature=0))
    assert steps[-1].finish_reason == "stop" and stats.completion_tokens == 1 and steps[-1].text == ""
    steps, stats = run(engine, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert steps[-1].finish_reason == "length" and stats.completion_tokens == 5


def test_cancellation_stops_at_the_next_token(make_engine):
    engine = make_engine()
    count = 0

    def cancelled():
        return count >= 3

    for _ in engine.generate(list(range(10, 20)), SamplingParams(max_tokens=50, ignore_eos=True), cancelled=cancelled):
        count += 1
    assert count == 3
