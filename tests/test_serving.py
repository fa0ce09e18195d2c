"""The serving layer against a fake engine: chunk shapes, usage, queue bounds, cancellation."""

import asyncio

import pytest

from prompts import builtin_template
from server.engine.engine import ContextLengthExceeded
from server.service.prompter import Prompter
from server.service.protocol import ChatCompletionRequest, CompletionRequest
from server.service.scheduling import QueueFull
from server.service.serving import ChatService, ModelNotFound
from tests.harness import FakeEngine


def service(tokenizer, engine, max_queue=2):
    return ChatService(engine, Prompter(tokenizer, builtin_template("chatml")), "tiny", max_queue, 64)


def chat(**extra):
    return ChatCompletionRequest.parse({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra})


async def collect(aiter):
    return [item async for item in aiter]


async def until_idle(svc, timeout=5.0):
    """The turn is released when the engine thread finishes, just after the response is complete."""
    for _ in range(int(timeout / 0.01)):
        if svc.queue.running == 0 and svc.queue.waiting == 0:
            return True
        await asyncio.sleep(0.01)
    return False


def test_stream_chunks_follow_the_openai_shape(tokenizer):
    svc = service(tokenizer, FakeEngine())
    request = chat(stream=True, stream_options={"include_usage": True})

    async def run():
        return await collect(svc.chat_chunks(await svc.prepare_chat(request)))

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices].count("stop") == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there friend"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_non_stream_drains_the_same_stream(tokenizer):
    svc = service(tokenizer, FakeEngine())

    async def run():
        return await svc.chat_response(await svc.prepare_chat(chat(max_tokens=2)))

    response = asyncio.run(run())
    assert response.choices[0].message.content == "Hello there"
    assert response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == response.usage.prompt_tokens + 2


def test_completion_stream(tokenizer):
    svc = service(tokenizer, FakeEngine())
    request = CompletionRequest.parse({"model": "tiny", "prompt": "Once", "max_tokens": 5})

    async def run():
        return await collect(svc.completion_chunks(await svc.prepare_completion(request)))

    chunks = asyncio.run(run())
    assert "".join(c.choices[0].text for c in chunks) == "Hello there friend"


def test_wrong_model_and_too_long_prompt_fail_before_streaming(tokenizer):
    svc = service(tokenizer, FakeEngine(context_length=30))
    with pytest.raises(ModelNotFound):
        asyncio.run(
            svc.prepare_chat(
                ChatCompletionRequest.parse({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
            )
        )
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(svc.prepare_chat(chat(max_tokens=25)))


def test_queue_admits_max_queue_waiters_then_refuses(tokenizer):
    engine = FakeEngine(reply="a b c d e f g h", step_s=0.05)
    svc = service(tokenizer, engine, max_queue=1)

    async def scenario():
        first = asyncio.ensure_future(svc.chat_response(await svc.prepare_chat(chat())))
        await asyncio.sleep(0.05)  # first is running
        second = asyncio.ensure_future(svc.chat_response(await svc.prepare_chat(chat())))
        await asyncio.sleep(0.05)  # second is waiting
        with pytest.raises(QueueFull):
            await svc.prepare_chat(chat())
        results = await asyncio.gather(first, second)
        assert await until_idle(svc)
        return results

    assert all(r.choices[0].finish_reason == "stop" for r in asyncio.run(scenario()))


def test_cancelled_stream_stops_the_engine_and_frees_the_turn(tokenizer):
    engine = FakeEngine(reply=" ".join(["w"] * 200), step_s=0.01)
    svc = service(tokenizer, engine)

    async def scenario():
        stream = svc.chat_chunks(await svc.prepare_chat(chat(stream=True)))
        async for chunk in stream:
            if engine.steps_run >= 3:
                break
        await stream.aclose()
        next_response = await asyncio.wait_for(svc.chat_response(await svc.prepare_chat(chat(max_tokens=1))), 5)
        return next_response

    response = asyncio.run(scenario())
    assert response.choices[0].message.content == "w"
    assert engine.steps_run < 20  # stopped within a token or so, not after 200


def test_a_burst_is_admitted_up_to_capacity_and_abandoned_admissions_are_returned(tokenizer):
    svc = service(tokenizer, FakeEngine(), max_queue=2)
    admitted = [asyncio.run(svc.prepare_chat(chat())) for _ in range(3)]  # one to run, two to wait
    with pytest.raises(QueueFull):
        asyncio.run(svc.prepare_chat(chat()))
    for generation in admitted:
        generation.abandon()
        generation.abandon()  # idempotent
    assert svc.queue.waiting == 0

    async def one_more():
        await svc.chat_response(await svc.prepare_chat(chat()))
        return await until_idle(svc)

    assert asyncio.run(one_more())
