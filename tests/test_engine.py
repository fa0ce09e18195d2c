"""The engine on tiny random models, with each decoder: prefix reuse is exact, limits and cancellation hold."""

import pytest
import torch

from server.engine.engine import ContextLengthExceeded, Engine, GenerationStats
from server.engine.prefix_cache import PrefixCache, common_prefix_length
from server.engine.resync import resync
from server.engine.sampling import SamplingParams
from server.runtime.decoders import HFDecoder, StaticDecoder, make_decoder

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(params=["hf", "static"])
def make_engine(request, tiny_model, tokenizer):
    def make(context=256, eos=frozenset(), kept_mb=0.0):
        if request.param == "hf":
            decoder = HFDecoder(tiny_model)
        else:
            decoder = make_decoder(lambda: tiny_model, tiny_model.config, context)
            assert isinstance(decoder, StaticDecoder)
        return Engine(decoder, tokenizer, context, set(eos), PrefixCache(int(kept_mb * 2**20)) if kept_mb else None)

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


@pytest.fixture
def text_codec(tokenizer):
    """Text to the default tokenizer's ids, as a client's prompt is tokenized, and ids back to text, as ``resync``
    decodes them."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def decode(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return encode, decode


def test_a_resent_answer_comes_from_the_cache_as_the_model_wrote_it(make_engine, text_codec):
    """A model may write "Hel" + "lo" where the tokenizer has "Hello": the client's next prompt, the answer
    resent as text, then reuses the answer's cached tokens, and computes what a fresh cache computes for them."""
    encode, decode = text_codec
    written = encode("Hel") + encode("lo") + encode(" there, friend")
    assert decode(written) == "Hello there, friend" and written != encode("Hello there, friend")
    answered = encode("<|im_start|>user\nWho is it?<|im_end|>\n<|im_start|>assistant\n") + written
    follow_up = encode(decode(answered) + "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n")
    assert common_prefix_length(answered, follow_up) < len(answered)  # the tokenizer parts from the answer
    warm = make_engine()
    run(warm, answered, SamplingParams(max_tokens=1, temperature=0))  # the cache holds all of ``answered``
    steps, stats = run(warm, follow_up)
    assert stats.cached_tokens == len(answered)
    spliced = answered + follow_up[len(follow_up) - (stats.prompt_tokens - len(answered)) :]
    assert decode(spliced) == decode(follow_up)
    assert [s.text for s in steps] == [s.text for s in run(make_engine(), spliced)[0]]
    taking_turns = make_engine(kept_mb=16)  # another user in between: the answer comes back from the kept copy
    run(taking_turns, answered, SamplingParams(max_tokens=1, temperature=0))
    run(taking_turns, encode("Someone else, asking about something else entirely."))
    steps_after, stats_after = run(taking_turns, follow_up)
    assert stats_after.cached_tokens == len(answered) and [s.text for s in steps_after] == [s.text for s in steps]
    other = encode(decode(answered[: -len(written)]) + "Goodbye")  # text that parts from the cache's: as it is
    live = common_prefix_length(answered, other)
    assert resync(decode, answered, other, live) == (other, live)


def test_of_two_kept_states_of_a_conversation_the_one_its_resent_text_goes_on_with_comes_back(text_codec):
    """A client's tokens part from the model's at the first answer the tokenizer splits otherwise, so every later
    state of that conversation shares only that much with the next prompt: the engine brings back the state whose
    text the prompt goes on with the furthest (``resync``), not the least recently used of the two."""
    encode, decode = text_codec
    written = encode("<|im_start|>user\nWho is it?<|im_end|>\n<|im_start|>assistant\n") + encode("Hel") + encode("lo")
    earlier = written + encode(" there, fri") + encode("end")  # a turn, its answer's last token not yet computed
    later = written + encode(
        " there, friend<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\nFine"
    )
    assert later[: len(earlier)] != earlier and decode(later).startswith(decode(earlier))
    prompt = encode(decode(later) + "<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n")  # the history resent as text
    shared = common_prefix_length(earlier, prompt)
    assert shared == common_prefix_length(later, prompt) < len(written)
    cache = PrefixCache(budget_bytes=100)
    cache.keep(tuple(earlier), "earlier", 1)
    cache.keep(tuple(later), "later", 1)
    assert cache.longest(prompt, better_than=0)[0].kv == "earlier"  # by shared tokens alone: a tie, the older

    def reach(ids, shared: int) -> int:
        return resync(decode, list(ids), prompt, shared)[1]

    assert reach(later, shared) > reach(earlier, shared) >= len(earlier) - 1
    kept, length = cache.longest(prompt, better_than=0, reach=reach)
    assert kept.kv == "later" and length == shared


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, 2000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_users_taking_turns_get_their_conversations_back_exactly(make_engine):
    shared = random_ids(8, 0)  # a system prompt both conversations start with
    first_a, first_b = shared + random_ids(40, 1), shared + random_ids(40, 2)

    def turn(engine, history, seed):
        steps, stats = run(engine, history)
        return history + random_ids(6, seed) + random_ids(10, seed + 1), [s.text for s in steps], stats

    alone = make_engine()  # user A only: the live cache carries the conversation
    a2, _, _ = turn(alone, first_a, 10)
    _, alone_answer, alone_stats = turn(alone, a2, 20)

    taking_turns = make_engine(kept_mb=16)
    a2, _, _ = turn(taking_turns, first_a, 10)
    b2, _, b_stats = turn(taking_turns, first_b, 30)
    assert b_stats.cached_tokens == len(shared)  # B shares only the system prompt with A
    _, answer, stats = turn(taking_turns, a2, 20)  # A again: its cache comes back from the kept copy
    assert stats.cached_tokens == alone_stats.cached_tokens == len(first_a)
    assert answer == alone_answer
    assert run(taking_turns, b2)[1].cached_tokens == len(first_b)  # and B's, which A's turn put aside
    kept = taking_turns.prefix_cache  # A's first and second turns and B's first
    assert (kept.hits, kept.misses, len(kept)) == (2, 2, 3) and kept.nbytes > 0


def test_a_conversation_too_big_for_the_budget_is_not_copied(make_engine):
    engine = make_engine(kept_mb=16)
    run(engine, random_ids(20, 1))
    engine.keep_live()  # the first copy: a position's bytes learnt
    kept = engine.prefix_cache
    assert len(kept) == 1
    kept.budget_bytes = kept.nbytes * 2  # room for about 50 positions
    snapshot, copied = engine.decoder.snapshot, []
    engine.decoder.snapshot = lambda *args: copied.append(args) or snapshot(*args)
    run(engine, random_ids(100, 2))  # the first conversation is kept already
    engine.keep_live()  # 105 positions: more than the budget
    assert copied == [] and len(kept) == 1


def test_kept_conversations_fit_the_budget_least_recently_used_first():
    cache = PrefixCache(budget_bytes=100)
    cache.keep((1, 2, 3), "a", 40)
    cache.keep((4, 5), "b", 40)
    assert cache.longest([1, 2, 3, 9], better_than=0)[1] == 3  # A is now the most recent
    cache.keep((6, 7), "c", 40)  # over budget: B, the least recently used, goes
    assert cache.longest([4, 5], better_than=0) == (None, 0) and cache.nbytes == 80
    cache.keep((1, 2, 3, 4, 5), "a2", 40)  # continues A: replaces it
    assert len(cache) == 2 and cache.covers((1, 2, 3)) and not cache.covers((1, 2, 4))
    assert cache.longest([1, 2, 3, 4], better_than=4) == (None, 4)  # no better than the live cache
    cache.keep(tuple(range(50)), "too big", 101)
    assert len(cache) == 2 and (cache.hits, cache.misses) == (1, 2)


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
