"""Choosing the next token from logits: penalties, temperature, top-k, top-p, seeded randomness."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI: over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL: over prompt and generated tokens
    ignore_eos: bool = False


def new_generator(seed: int | None) -> np.random.Generator:
    """The random numbers of one generation: seeded (any integer), or from fresh entropy."""
    return np.random.default_rng(None if seed is None else seed % 2**64)


def penalized(params: SamplingParams, generated: list[int]) -> bool:
    """Whether ``apply_penalties`` changes any logit."""
    return params.repetition_penalty != 1.0 or bool(generated and (params.presence_penalty or params.frequency_penalty))


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], generated: list[int]
) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(generated)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def processed_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int],
    generated: list[int],
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits the sampler draws from (before temperature and truncation): penalties applied, tokens a
    grammar does not allow (``allowed`` False) at -inf. Penalties that overflow a logit to infinity leave it
    the largest finite one."""
    if penalized(params, generated):  # in place, on a copy
        logits = apply_penalties(logits.float().clone(), params, prompt_ids, generated)
    elif allowed is None and all(math.isfinite(bound) for bound in torch.aminmax(logits.float())):
        return logits.float()  # nothing to replace (a NaN would make both bounds NaN)
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    return logits


def first_maximum(logits: torch.Tensor) -> int:
    """The index of a 1-D float32 vector's largest value, the first of equal ones (a NaN counts as the largest),
    as ``torch.argmax`` gives it: numpy's argmax scans a vocabulary's logits in vectors, torch's CPU argmax
    one value at a time (ten times longer, a per cent of a small model's decode step)."""
    return int(logits.numpy().argmax())


def greedy_shortcut(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> int | None:
    """The greedy token read off the model's logits where processing them (``processed_logits`` without a
    grammar) could not change it: no penalty, and their largest value finite (not NaN nor infinite, which
    processing replaces). None where it could: process them. It spares a decode step two passes over the
    vocabulary's logits."""
    if params.temperature != 0 or penalized(params, generated):
        return None
    values = logits.float().numpy()
    token = int(values.argmax())  # the first maximum; the first NaN where there is one
    return token if math.isfinite(values[token]) else None


def choose(logits: torch.Tensor, params: SamplingParams, generator: np.random.Generator) -> int:
    """One token id from processed logits. Safe for every value the protocol accepts: logits are shifted to
    a maximum of 0 before the temperature divides them, so a tiny temperature sends the others to -inf,
    never to NaN. Truncation (``top_k``, then ``top_p`` of what is left) ranks only the likeliest tokens
    (``_candidates``), and the draw inverts cumulative probabilities (``_draw``). In numpy, whose operations
    cost less to call than torch's on one vector: with ``torch.multinomial`` and a sort of the vocabulary,
    sampling took several times a small model's decode step, and each torch operation still a few per cent."""
    values = logits.float().numpy()
    peak = values.max()  # NaN if any is (none after processing)
    if params.temperature == 0 or not np.isfinite(peak):
        return first_maximum(logits)
    # the softmax's numerators (the largest 1); a temperature below float32's range would divide by zero
    temperature = np.float32(max(params.temperature, float(np.finfo(np.float32).tiny)))
    with np.errstate(over="ignore", under="ignore"):  # a tiny temperature's quotients go to -inf, as meant
        weights = np.subtract(values, peak)
        weights /= temperature
        np.exp(weights, out=weights)
    if params.top_k <= 0 and params.top_p >= 1.0:
        return _draw(weights, generator)
    probs, ids = _candidates(weights, params.top_k, params.top_p)
    if params.top_p < 1.0:  # keep the smallest set reaching top_p: each token whose likelier ones do not
        probs = probs[: int(np.count_nonzero(np.cumsum(probs) - probs <= params.top_p))]
    return int(ids[_draw(probs, generator)])


# Tokens ranked first for top-p: a chat model's nucleus is usually a few dozen; the rank widens until it holds it.
NUCLEUS_GUESS = 64


def _candidates(weights: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The likeliest tokens' probabilities (from the softmax's numerators ``weights``), in decreasing order, and
    their ids: the ``top_k`` (renormalized among themselves, as top-p then sees them), or enough of them that
    their mass exceeds ``top_p`` (no token after them can be in its nucleus), or all."""
    ranked, vocabulary = torch.from_numpy(weights), len(weights)
    if top_k > 0:
        values, ids = (t.numpy() for t in torch.topk(ranked, min(top_k, vocabulary)))
        return values / values.sum(dtype=np.float64), ids
    total, count = weights.sum(dtype=np.float64), min(NUCLEUS_GUESS, vocabulary)
    while True:
        values, ids = (t.numpy() for t in torch.topk(ranked, count))
        if count == vocabulary or values.sum(dtype=np.float64) > top_p * total:
            return values / total, ids
        count = min(4 * count, vocabulary)


DRAW_BLOCK = 256  # weights a block of the draw's first scan


def _draw(weights: np.ndarray, generator: np.random.Generator) -> int:
    """An index drawn with probability proportional to ``weights`` (1-D): a uniform draw over their total, found
    among the blocks' cumulative totals, then among the cumulative weights of its block, in FP64 (a large
    vocabulary's least likely tokens keep their chance): two short scans, not one over all."""
    whole = len(weights) - len(weights) % DRAW_BLOCK
    totals = weights[:whole].reshape(-1, DRAW_BLOCK).sum(-1, dtype=np.float64)
    if whole < len(weights):
        totals = np.append(totals, weights[whole:].sum(dtype=np.float64))
    reach = np.cumsum(totals)
    u = generator.random() * reach[-1]
    block = _first_above(reach, u)
    start = block * DRAW_BLOCK
    inside = np.cumsum(weights[start : start + DRAW_BLOCK], dtype=np.float64)
    return start + _first_above(inside, u - (reach[block - 1] if block else 0.0))


def _first_above(cumulative: np.ndarray, u: float) -> int:
    """The first index whose cumulative value exceeds ``u``; where rounding left none (``u`` at the total), the
    last with any weight of its own, never one without."""
    index = int(np.searchsorted(cumulative, u, side="right"))
    if index == len(cumulative):
        index = int(np.searchsorted(cumulative, cumulative[-1]))
    return index


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: list[int],
    generated: list[int],
    allowed: torch.Tensor | None = None,
) -> int:
    """One token id from a 1-D logits vector (see ``processed_logits`` and ``choose``)."""
    if allowed is None and (token := greedy_shortcut(logits, params, generated)) is not None:
        return token
    return choose(processed_logits(logits, params, prompt_ids, generated, allowed), params, generator)


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability and the ``top`` most likely tokens' (id, log probability), from the
    log-softmax of the processed logits: what the sampler drew from, before temperature and truncation."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(processed: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The top tokens are ranked by the logits, equal ones by token id, as greedy decoding picks (``argmax``:
    the first of equal maxima): logits rounded to BF16 (a weight-only LM head) tie often, and a greedy
    choice then leads its list."""
    logprobs = torch.log_softmax(processed, dim=-1)
    values, ids = torch.topk(processed, top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
    ranked = [i for _, i in sorted(zip((-v for v in values.tolist()), ids.tolist()))]
    return TokenLogprobs(token, float(logprobs[token]), tuple(zip(ranked, logprobs[ranked].tolist())))
