"""Streaming text: UTF-8-safe incremental detokenization and stop strings held back until decided."""

import pytest

from server.engine.textstream import IncrementalDetokenizer, StopStrings

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 😀👍🏽 and 🇫🇷 flags", "naïve café — “quotes”", "plain ascii text"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_never_emits_replacement_characters(tokenizer, text):
    prompt = tokenizer("Say:", add_special_tokens=False).input_ids
    ids = tokenizer(" " + text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == " " + text


def test_stop_string_is_cut_and_never_emitted():
    stops = StopStrings(["USER:"])
    out = []
    for part in ["Hello", " there", " US", "ER", ": more"]:
        text, stopped = stops.feed(part)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello there "
    assert stopped


def test_partial_stop_is_held_back_then_released():
    stops = StopStrings(["</s>"])
    assert stops.feed("a </") == ("a ", False)
    assert stops.feed("b") == ("</b", False)
    assert stops.feed(" <") == (" ", False)
    assert stops.flush() == "<"


def test_earliest_of_several_stops_wins():
    stops = StopStrings(["END", "##"])
    assert stops.feed("one ## two END") == ("one ", True)
