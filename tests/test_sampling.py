"""Sampling: greedy, seeds, top-k/top-p truncation, penalties."""

import torch

from server.sampling import SamplingParams, apply_penalties, new_generator, sample


def logits():
    return torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_takes_the_argmax():
    assert sample(logits(), SamplingParams(max_tokens=1, temperature=0), new_generator(None), [], []) == 1


def test_same_seed_same_tokens_different_seed_differs():
    params = SamplingParams(max_tokens=1, temperature=1.5)
    draw = lambda seed: [sample(logits(), params, g, [], []) for g in [new_generator(seed)] for _ in range(50)]
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
