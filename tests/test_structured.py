"""Constrained decoding and tool calls without a server: grammars from schemas and tool lists on the real
tokenizer, the engine held to them on a tiny random model, and tool calls cut out of text as it streams."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

from prompts.tools import default_tool_format, with_tools
from server.engine.engine import Engine, StepOutput
from server.engine.grammar import GrammarError, Grammars
from server.engine.sampling import SamplingParams
from server.runtime.decoders import HFDecoder
from server.service.chunks import ChatChoiceStream, ChoiceAnswer, TokenTexts
from server.service.generation import ToolCalling
from server.service.tools import ToolCallStream, split_calls
from tests.harness import tiny_llama

FMT = default_tool_format()
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer))


def walk(grammars, grammar: str, tokenizer, text: str):
    """Feed ``text``'s tokens to a matcher while its mask allows them: the matcher at the end, or None where
    the mask refused a token (advancing past one raises GrammarError)."""
    matcher = grammars.matcher(grammar)
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        if not matcher.allowed()[token]:
            with pytest.raises(GrammarError):
                matcher.advance(token)
            return None
        matcher.advance(token)
    return matcher


def test_a_schema_allows_its_json_token_by_token_and_no_other(grammars, tokenizer):
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["mood", "score"],
        "additionalProperties": False,
    }
    grammar = grammars.json_schema(schema)
    matcher = walk(grammars, grammar, tokenizer, '{"mood": "happy", "score": 4}')
    assert matcher.finished
    start = grammars.matcher(grammar).allowed()
    opening = [tokenizer.decode([int(token)]) for token in start.nonzero().flatten()]
    assert 0 < len(opening) < 20 and all(text.startswith("{") for text in opening)  # only ways to open the object
    assert walk(grammars, grammar, tokenizer, '{"mood": "angry"') is None


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"$ref": "#/nowhere"}, {"type": "string", "pattern": "("}])
def test_a_schema_the_engine_cannot_enforce_is_a_grammar_error(grammars, schema):
    with pytest.raises(GrammarError):
        grammars.json_schema(schema)


def test_the_tool_call_grammar_takes_calls_of_the_given_functions_only(grammars, tokenizer):
    grammar = grammars.tool_calls({"get_weather": WEATHER}, False, FMT.call_begin, FMT.call_end)
    matcher = walk(grammars, grammar, tokenizer, FMT.call("get_weather", {"city": "Oslo"}))
    assert matcher.finished
    assert walk(grammars, grammar, tokenizer, FMT.call("get_time", {})) is None
    both = grammars.tool_calls({"get_weather": WEATHER, "get_time": None}, True, FMT.call_begin, FMT.call_end)
    text = FMT.call("get_time", {}) + "\n" + FMT.call("get_weather", {"city": "Rome"})
    assert not walk(grammars, both, tokenizer, text).finished  # parallel: a third call may follow


def test_the_engine_held_to_a_schema_writes_valid_json_and_stops(grammars, tokenizer):
    engine = Engine(HFDecoder(tiny_llama(len(tokenizer))), tokenizer, 256, set())
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    for seed in range(3):  # random weights: any token the grammar allows may come
        params = SamplingParams(max_tokens=100, temperature=1.0, seed=seed)
        steps = list(engine.generate([1, 2, 3], params, matcher=grammars.matcher(grammars.json_schema(schema))))
        assert steps[-1].finish_reason == "stop"
        jsonschema_rs.validate(schema, json.loads("".join(step.text for step in steps)))


def test_tool_calls_are_cut_out_of_streamed_text_in_any_pieces():
    names = {"get_weather"}
    text = (
        "Let me check. "
        + FMT.call("get_weather", {"city": "Oslo"})
        + " and "
        + FMT.call("unknown", {})
        + FMT.call("get_weather", {"city": "Bergen"})
    )
    for size in (1, 3, 7, len(text)):
        stream = ToolCallStream(FMT, names)
        content = "".join(stream.feed(text[i : i + size])[0] for i in range(0, len(text), size)) + stream.finish()
        assert content == "Let me check.  and " + FMT.call("unknown", {})
        assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == [
            ("get_weather", {"city": "Oslo"}),
            ("get_weather", {"city": "Bergen"}),
        ]
    content, calls = split_calls(FMT.call("get_weather", '{"city": "Oslo"}'), FMT, names)  # arguments as text
    assert content == "" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert len({c.id for c in stream.calls}) == 2


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_an_answer_with_calls_ends_with_tool_calls_unless_max_tokens_cut_it(tokenizer, finish):
    """OpenAI's finish reasons: calls make it ``tool_calls``, but an answer that max_tokens cut short (a
    second call half written) says ``length``, streamed or whole."""
    tools = ToolCalling(FMT, frozenset({"get_weather"}))
    pieces = [FMT.call("get_weather", {"city": "Oslo"}), FMT.call("get_weather", {"city": "Ber"})[:20]]
    steps = [StepOutput(pieces[0]), StepOutput(pieces[1], finish)]
    expected = "tool_calls" if finish == "stop" else "length"
    stream = ChatChoiceStream(0, TokenTexts(tokenizer), tools, False)
    assert [stream.step(step)[2] for step in steps] == [None, expected]
    answer = ChoiceAnswer(0)
    for step in steps:
        answer.add(step)
    assert answer.chat(TokenTexts(tokenizer), tools, False).finish_reason == expected


def test_tools_and_calls_become_plain_turns_for_templates_without_tools():
    tools = [{"name": "get_weather", "description": "Weather", "parameters": WEATHER}]
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}],
        },
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
    ]
    turns = with_tools(messages, tools, FMT)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert json.dumps({"type": "function", "function": tools[0]}) in turns[0]["content"]
    assert turns[2]["content"] == FMT.call("get_weather", {"city": "Oslo"})
    assert "12 C" in turns[3]["content"] and turns[3]["content"] != "12 C"
