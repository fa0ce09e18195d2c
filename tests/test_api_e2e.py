"""The OpenAI API that applications use, through the official ``openai`` client against the real server on
the default model: structured outputs (a pydantic model through ``parse``, a fixed set of bounded schemas),
tool calls (required, named, streamed, a tool-result turn), log probabilities against the model's own
logits, ``n`` choices with a seed, /tokenize and /detokenize, and the 400s of what cannot be honoured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from quant.checkpoint import load_checkpoint, read_checkpoint_info
from server.runtime.decoders import make_decoder

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Oslo right now?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0, le=50_000_000)


def test_parse_fills_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the name, country and population of Paris in JSON."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City) and choice.message.parsed.name


@pytest.mark.parametrize("case", SCHEMAS, ids=[case["name"] for case in SCHEMAS])
def test_every_answer_validates_against_its_strict_schema(client, case):
    response_format = {"type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"]}}
    response_format["json_schema"]["strict"] = True
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": case["prompt"]}],
        response_format=response_format,
        max_tokens=400,
        temperature=0.7,
        seed=1,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema_rs.validate(case["schema"], json.loads(choice.message.content))


def test_json_object_mode_gives_an_object_and_max_tokens_cuts_it_with_length(client):
    messages = [{"role": "user", "content": "Describe a cat in JSON."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object"}, max_tokens=300, temperature=0
    )
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(whole.choices[0].message.content), dict)
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object"}, max_tokens=3, temperature=0
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def _valid_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema_rs.validate(WEATHER["function"]["parameters"], arguments)
    return arguments


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_tool_call_is_parsed_and_its_arguments_validate(client, tool_choice):
    # one call: with parallel calls allowed, a model this small may go on calling until max_tokens ends it
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    if tool_choice == "required" and call.function.name == "get_time":  # either function may be called
        jsonschema_rs.validate(TIME["function"]["parameters"], json.loads(call.function.arguments))
    else:
        _valid_weather_call(call)


def test_streamed_tool_calls_carry_indices_and_add_up_to_the_whole_answer(client):
    request = dict(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        temperature=0,
    )
    whole = client.chat.completions.create(**request).choices[0]
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            finishes.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finishes[-1] == "tool_calls" and sorted(calls) == list(range(len(whole.message.tool_calls)))
    for index, call in enumerate(whole.message.tool_calls):
        assert calls[index]["id"].startswith("call_")
        assert (calls[index]["name"], json.loads(calls[index]["arguments"])) == (
            call.function.name,
            json.loads(call.function.arguments),
        )


def test_a_tool_result_turn_reaches_the_model(client):
    call = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0
    )
    assistant = call.choices[0].message
    result = "Oslo: 14 degrees celsius, light rain, wind 5 m/s from the west."
    turn = ASK_WEATHER + [
        assistant.model_dump(exclude_none=True, exclude={"parsed"}),
        {"role": "tool", "tool_call_id": assistant.tool_calls[0].id, "content": result},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER], max_tokens=40, temperature=0)
    without = client.chat.completions.create(
        model=MODEL, messages=turn[:-1] + [{**turn[-1], "content": "ok"}], tools=[WEATHER], max_tokens=1
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    # the tool's words are in the prompt the model read
    assert answer.usage.prompt_tokens - without.usage.prompt_tokens >= 10


@pytest.fixture(scope="module")
def direct(cache_dir):
    """The served checkpoint, run here by the server's own eager decoder: greedy tokens with the log-softmax
    of the logits each was chosen from."""
    (path,) = [p for p in cache_dir.iterdir() if p.name.startswith(MODEL)]
    info = read_checkpoint_info(path)
    decoder = make_decoder(lambda: load_checkpoint(path).model, info.config, 512)

    def greedy(prompt: str, steps: int) -> list[tuple[str, torch.Tensor]]:
        prompt_ids = info.tokenizer(prompt, add_special_tokens=False).input_ids
        decoder.reset()
        decoder.forward(prompt_ids[:-1], 0)  # as the engine prefills: the last prompt token goes alone
        chosen, logits = [], decoder.forward(prompt_ids[-1:], len(prompt_ids) - 1)
        for _ in range(steps):
            row = torch.log_softmax(logits.float().flatten(), -1)
            chosen.append((int(row.argmax()), row))
            logits = decoder.forward([chosen[-1][0]], len(prompt_ids) + len(chosen) - 1)
        return [(info.tokenizer.decode([token]), row) for token, row in chosen]

    return greedy


def test_logprobs_are_the_log_softmax_of_the_models_logits(client, direct):
    # A prompt that shares no prefix with the last request's: the server computes it whole, as here (a
    # prompt's dynamic INT8 scales depend on which of its tokens are computed together).
    prompt = "Zebras live in"
    completion = client.completions.create(model=MODEL, prompt=prompt, logprobs=5, max_tokens=6, temperature=0)
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    scored = completion.choices[0].logprobs
    assert len(scored.tokens) == completion.usage.completion_tokens == 6
    assert "".join(scored.tokens) == completion.choices[0].text
    assert scored.text_offset == [sum(len(t) for t in scored.tokens[:i]) for i in range(6)]
    for token, logprob, top, (expected, row) in zip(
        scored.tokens, scored.token_logprobs, scored.top_logprobs, direct(prompt, 6), strict=True
    ):
        assert token == expected and logprob == pytest.approx(float(row.max()), abs=1e-4)
        values, ids = torch.topk(row, 5)
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)


def test_chat_logprobs_streamed_and_whole_are_one_distribution(client):
    request = dict(model=MODEL, messages=ASK_WEATHER, logprobs=True, top_logprobs=20, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**request).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(**request, stream=True)
        for choice in chunk.choices
        for entry in (choice.logprobs.content if choice.logprobs else ())
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    for entry in whole:  # greedy: each token is the most likely; the 20 are sorted and probabilities sum below 1
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 20 and tops == sorted(tops, reverse=True)
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, tops[0])
        assert sum(math.exp(lp) for lp in tops) <= 1 + 1e-4
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_n_choices_with_a_seed_are_reproducible_and_share_one_prefill(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}], n=3, seed=11, max_tokens=12)
    first, second = (client.chat.completions.create(**request) for _ in range(2))
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens >= 3 and first.usage.prompt_tokens == second.usage.prompt_tokens
    # the prompt was computed once: the other choices found it in the KV cache
    assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_tokenize_and_detokenize_as_llama_cpp_does(server, tokenizer):
    text = "Hello, café! <|im_start|>"
    tokens = httpx_post(server, "/tokenize", {"content": text})["tokens"]
    assert tokens == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokens  # special tokens in the text are parsed
    pieces = httpx_post(server, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == tokens and "".join(p["piece"] for p in pieces) == text
    assert httpx_post(server, "/detokenize", {"tokens": tokens})["content"] == text
    error = httpx_post(server, "/detokenize", {"tokens": [len(tokenizer) + 5]}, status=400)["error"]
    assert error["param"] == "tokens"


def httpx_post(server, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


@pytest.mark.parametrize(
    "extra,param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
            "response_format",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}},
            "tool_choice",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 17}, "n"),
    ],
    ids=["malformed-schema", "dangling-ref", "unknown-tool", "top-logprobs-21", "n-17"],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["message"], error
    assert client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1).choices  # still serving
