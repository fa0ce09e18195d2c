"""Sampling: greedy, seeds, top-k/top-p truncation, penalties."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.sampling import (
    SamplingParams,
    _draw,
    apply_penalties,
    choose,
    first_maximum,
    greedy_shortcut,
    new_generator,
    processed_logits,
    sample,
    token_logprobs,
)


def logits():
    return torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


# rows of logits with ties, infinities and NaN
LOGIT_ROWS = st.lists(
    st.one_of(st.sampled_from([2.0, -1.0, float("inf"), float("-inf"), float("nan")]), st.floats(width=32)),
    min_size=1,
    max_size=70,
)


def test_greedy_takes_the_argmax():
    assert sample(logits(), SamplingParams(max_tokens=1, temperature=0), new_generator(None), [], []) == 1


@settings(max_examples=200, deadline=None, derandomize=True)
@given(LOGIT_ROWS)
def test_the_greedy_maximum_is_torchs_argmax(values):
    """Ties, infinities and NaN (torch's argmax takes a NaN as the largest) pick the index torch picks."""
    row = torch.tensor(values, dtype=torch.float32)
    assert first_maximum(row) == int(row.argmax())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(LOGIT_ROWS)
def test_the_greedy_shortcut_picks_what_processed_logits_pick(values):
    """Read off the raw logits where it can (their maximum finite), the shortcut takes the token the processed
    logits give; where processing could change it (NaN, an infinity on top), it declines."""
    row, greedy = torch.tensor(values, dtype=torch.float32), SamplingParams(max_tokens=1, temperature=0)
    processed = choose(processed_logits(row, greedy, [], []), greedy, new_generator(0))
    token = greedy_shortcut(row, greedy, [])
    assert token is None or token == processed
    top = row[int(row.argmax())]
    assert (token is None) == bool(torch.isnan(top) or torch.isinf(top))


def test_the_greedy_shortcut_declines_sampling_and_penalties():
    row = logits()
    assert greedy_shortcut(row, SamplingParams(max_tokens=1, temperature=0.7), []) is None
    assert greedy_shortcut(row, SamplingParams(max_tokens=1, temperature=0, repetition_penalty=1.2), []) is None
    assert greedy_shortcut(row, SamplingParams(max_tokens=1, temperature=0, presence_penalty=1.0), [1]) is None
    assert greedy_shortcut(row, SamplingParams(max_tokens=1, temperature=0, presence_penalty=1.0), []) == 1


def test_a_greedy_choice_among_tied_logits_leads_its_top_logprobs():
    # BF16-rounded logits tie: the greedy token (argmax, the first of the tied) is listed first
    tied = torch.tensor([0.5, 2.0, -1.0, 2.0, 2.0, 1.0])
    token = sample(tied, SamplingParams(max_tokens=1, temperature=0), new_generator(None), [], [])
    scored = token_logprobs(tied, token, 4)
    assert token == 1 and [i for i, _ in scored.top] == [1, 3, 4, 5]
    assert scored.top[0][1] == scored.logprob and scored.logprob == scored.top[1][1]


def test_same_seed_same_tokens_different_seed_differs():
    params = SamplingParams(max_tokens=1, temperature=1.5)

    def draw(seed):
        return [sample(logits(), params, g, [], []) for g in [new_generator(seed)] for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_restrict_the_candidates():
    g = new_generator(0)
    top1 = {sample(logits(), SamplingParams(max_tokens=1, top_k=1), g, [], []) for _ in range(50)}
    assert top1 == {1}
    top2 = {sample(logits(), SamplingParams(max_tokens=1, top_k=2), g, [], []) for _ in range(200)}
    assert top2 == {1, 2}
    nucleus = {sample(logits(), SamplingParams(max_tokens=1, top_p=0.5), g, [], []) for _ in range(100)}
    assert nucleus == {1}


def test_penalties():
    params = SamplingParams(max_tokens=1, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_penalties(logits(), params, prompt_ids=[0], generated=[1, 1, 2])
    assert torch.allclose(out, torch.tensor([1.0, 3.0 - 1.0 - 1.0, 2.0 - 1.0 - 0.5, 0.5, -1.0]))
    rep = apply_penalties(logits(), SamplingParams(max_tokens=1, repetition_penalty=2.0), [4], [1])
    assert torch.allclose(rep, torch.tensor([1.0, 1.5, 2.0, 0.5, -2.0]))


def test_a_64_bit_seed_of_either_sign_seeds_a_generator():
    params = SamplingParams(max_tokens=1, temperature=1.0)
    for seed in (2**63 - 1, -(2**63), -1):
        first, again = (sample(logits(), params, new_generator(seed), [], []) for _ in range(2))
        assert first == again


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 2.0, allow_subnormal=True)),
    top_p=st.floats(5e-324, 1.0, exclude_min=False),
    top_k=st.integers(0, 10),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
    repetition=st.floats(5e-324, 1e308),
    scale=st.sampled_from([1.0, 1e30, 1e-30]),
)
def test_every_parameter_the_protocol_accepts_samples_a_valid_token(
    temperature, top_p, top_k, presence, frequency, repetition, scale
):
    """Extreme but valid values (a temperature of 1e-300, a repetition penalty of 5e-324) must never give a
    NaN distribution: sampling raised 'probability tensor contains inf, nan or element < 0' on them."""
    params = SamplingParams(
        max_tokens=1,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
    )
    token = sample(logits() * scale, params, new_generator(0), prompt_ids=[0, 3], generated=[1, 1, 4])
    assert 0 <= token < 5


def draws(row: torch.Tensor, params: SamplingParams, count: int) -> torch.Tensor:
    generator = new_generator(0)
    return torch.tensor([sample(row, params, generator, [], []) for _ in range(count)])


def test_sampling_draws_each_token_as_often_as_its_probability():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    counts = torch.bincount(draws(probs.log(), SamplingParams(max_tokens=1), 20000), minlength=5)
    assert counts[2] == 0
    torch.testing.assert_close(counts / 20000, probs, atol=0.015, rtol=0)


def test_top_p_keeps_the_smallest_set_that_reaches_it_renormalized():
    """Each token whose likelier ones hold no more than top_p stays: here the first two of 0.5, 0.3, 0.15, 0.05."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    counts = torch.bincount(draws(probs.log(), SamplingParams(max_tokens=1, top_p=0.7), 8000), minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 8000 - 0.5 / 0.8) < 0.03


def test_a_nucleus_wider_than_the_first_guess_is_found_whole():
    """A flat distribution over a vocabulary's size: top-p 0.5 keeps about half the tokens, far more than the
    first ranking (``NUCLEUS_GUESS``), and draws from all of them."""
    row = torch.linspace(0.0, 1e-3, 49152)  # the later tokens slightly likelier
    tokens = draws(row, SamplingParams(max_tokens=1, top_p=0.5), 2000)
    assert int(tokens.min()) >= 49152 // 2 - 100 and len(set(tokens.tolist())) > 1500


def test_top_k_then_top_p_sees_the_top_ks_probabilities_renormalized():
    # top-2 of 0.5, 0.3, 0.15, 0.05 renormalized: 0.625, 0.375; top-p 0.6 then keeps the first alone
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert set(draws(probs.log(), SamplingParams(max_tokens=1, top_k=2, top_p=0.6), 300).tolist()) == {0}
    assert set(draws(probs.log(), SamplingParams(max_tokens=1, top_k=2, top_p=0.7), 300).tolist()) == {0, 1}


class AtTheTop:
    """A generator whose uniform draw is 1: the top of [0, 1), where a draw times a total can round to."""

    def random(self) -> float:
        return 1.0


def test_a_draw_at_the_very_top_never_picks_a_token_without_probability():
    """A uniform draw times the total can round up to the total: the last token with any probability, not one
    that a grammar or top-k left at zero."""
    assert _draw(np.array([0.25, 0.75, 0.0, 0.0]), AtTheTop()) == 1


def test_draws_across_blocks_follow_the_weights():
    """The draw finds a block, then a token in it: heavy tokens in different blocks and in the short last one."""
    weights = np.full(1000, 1e-4, dtype=np.float32)
    weights[[3, 300, 555, 999]] = [4.0, 3.0, 2.0, 1.0]
    generator = new_generator(0)
    counts = np.bincount([_draw(weights, generator) for _ in range(20000)], minlength=1000)
    expected = weights / weights.sum()
    np.testing.assert_allclose(counts[[3, 300, 555, 999]] / 20000, expected[[3, 300, 555, 999]], atol=0.015)


def test_a_draw_at_the_very_top_of_several_blocks_takes_the_last_weighted_token():
    weights = np.zeros(700, dtype=np.float32)
    weights[[10, 400]] = 1.0
    assert _draw(weights, AtTheTop()) == 400
