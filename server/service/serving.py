"""Between the OpenAI protocol and the engine: prompts, the one-at-a-time queue, cancellation, chunks.

Every request becomes one stream of protocol chunks; a non-streaming request drains the same stream.
Validation, tokenization and the context-length and queue checks all happen in ``prepare``, before a
response starts, so their errors can still carry a proper HTTP status; tokenizing runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prompts import ChatTemplate, split_special
from server.engine.engine import Engine, GenerationStats, StepOutput
from server.engine.sampling import SamplingParams
from server.service.metrics import Metrics
from server.service.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    SamplingFields,
    Usage,
    new_id,
    now,
)
from server.service.scheduling import GenerationQueue

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    pass


class NotReady(RuntimeError):
    pass


class Prompter:
    """Chat messages or raw text to token ids; user text never becomes special tokens."""

    def __init__(self, tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._special = list(tokenizer.all_special_tokens) + [t for t in ("</s>",) if t in tokenizer.get_vocab()]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def chat_ids(self, messages: list[dict]) -> list[int]:
        pieces = self.template.render(
            messages,
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
        )
        ids: list[int] = []
        for kind, value in split_special(pieces, self._special):
            ids.extend([self.tokenizer.convert_tokens_to_ids(value)] if kind == "special" else self._text_ids(value))
        return ids

    def completion_ids(self, prompt: str) -> list[int]:
        """A raw prompt belongs wholly to the client, special tokens included (as in vLLM)."""
        return self.tokenizer(prompt, add_special_tokens=False).input_ids


@dataclass
class Generation:
    """A validated, tokenized request, admitted to the queue (which it must run or ``abandon``)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    queue: GenerationQueue
    stats: GenerationStats = field(default_factory=GenerationStats)
    created: int = field(default_factory=now)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to first token, once there is one
    finish_reason: str | None = None
    started: bool = False

    def abandon(self) -> None:
        """Give back the admission of a generation whose response never ran (safe to call always)."""
        if not self.started:
            self.started = True
            self.queue.admitted -= 1

    def usage(self) -> Usage:
        s = self.stats
        return Usage(
            prompt_tokens=s.prompt_tokens,
            completion_tokens=s.completion_tokens,
            total_tokens=s.prompt_tokens + s.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=s.cached_tokens),
        )


class ChatService:
    def __init__(
        self,
        engine: Engine,
        prompter: Prompter,
        model_name: str,
        max_queue: int,
        default_max_tokens: int,
        metrics: Metrics | None = None,
        heartbeat_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.prompter = prompter
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.queue = GenerationQueue(max_queue)
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics or Metrics()
        self.metrics.watch_queue(self.queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="q8chat-engine")

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=now())])

    # -- preparing -----------------------------------------------------------------------------
    def _check_model(self, request: SamplingFields) -> None:
        if request.model != self.model_name:
            raise ModelNotFound(f"The model '{request.model}' does not exist; this server serves '{self.model_name}'.")

    def _params(self, request: SamplingFields, prompt_tokens: int, stops: tuple[str, ...]) -> SamplingParams:
        limit = request.completion_limit
        self.engine.check_length(prompt_tokens, limit)
        return SamplingParams(
            max_tokens=limit if limit is not None else self.default_max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop_strings() + stops,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            ignore_eos=request.ignore_eos,
        )

    async def _prepare(self, prefix: str, tokenize, request: SamplingFields, stops: tuple[str, ...]) -> Generation:
        """Tokenize on a worker thread (rendering and tokenizing a megabyte takes seconds, which the event loop,
        /health included, must not wait for), then admit the request to the queue."""
        self._check_model(request)
        ids = await asyncio.to_thread(tokenize)
        params = self._params(request, len(ids), stops)
        self.queue.admit()
        return Generation(new_id(prefix), ids, params, request.include_usage, self.queue)

    async def prepare_chat(self, request: ChatCompletionRequest) -> Generation:
        messages = [m.as_template_message() for m in request.messages]
        return await self._prepare(
            "chatcmpl", lambda: self.prompter.chat_ids(messages), request, self.prompter.template.stop
        )

    async def prepare_completion(self, request: CompletionRequest) -> Generation:
        return await self._prepare("cmpl", lambda: self.prompter.completion_ids(request.prompt), request, ())

    # -- running -------------------------------------------------------------------------------
    async def run(self, generation: Generation) -> AsyncIterator[StepOutput | None]:
        """Wait for the turn, then yield the engine's steps; ``None`` is a heartbeat, yielded after
        ``heartbeat_s`` without a step (waiting in line, or a long prefill). Closing this iterator early
        (a client that went away) stops the generation at its next token; the turn ends when the engine
        is free."""
        generation.started = True
        turn = self.queue.enter()
        try:
            while not turn.done():
                if not (await asyncio.wait({turn}, timeout=self.heartbeat_s))[0]:
                    yield None
            turn.result()  # ShuttingDown if the queue was closed meanwhile
        except BaseException:
            self.queue.leave(turn)
            raise
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def work() -> None:
            try:
                for step in self.engine.generate(
                    generation.prompt_ids, generation.params, generation.stats, cancelled=cancel.is_set
                ):
                    loop.call_soon_threadsafe(steps.put_nowait, step)
            except Exception as exc:
                log.exception("generation %s failed", generation.id)
                loop.call_soon_threadsafe(steps.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(steps.put_nowait, done)

        try:
            future = loop.run_in_executor(self._executor, work)
        except BaseException:
            self.queue.release()
            raise
        future.add_done_callback(lambda _: self.queue.release())
        last = None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(steps.get(), self.heartbeat_s)
                except TimeoutError:
                    yield None
                    continue
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise item
                self._observe_token(generation, last)
                last = time.perf_counter()
                generation.finish_reason = item.finish_reason
                yield item
        finally:
            cancel.set()
            self._observe_finish(generation)

    def _observe_token(self, generation: Generation, last: float | None) -> None:
        now_s = time.perf_counter()
        if last is None:
            generation.first_token_s = now_s - generation.arrived
            self.metrics.time_to_first_token.observe(generation.first_token_s)
        else:
            self.metrics.inter_token_latency.observe(now_s - last)

    def _observe_finish(self, generation: Generation) -> None:
        self.metrics.prompt_tokens.inc(generation.stats.prompt_tokens)
        self.metrics.cached_prompt_tokens.inc(generation.stats.cached_tokens)
        self.metrics.generation_tokens.inc(generation.stats.completion_tokens)

    async def chat_chunks(self, generation: Generation) -> AsyncIterator[ChatCompletionChunk | None]:
        """The chunks of a streamed chat completion; ``None`` is a heartbeat (an SSE comment)."""

        def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=generation.id,
                created=generation.created,
                model=self.model_name,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )

        yield chunk(Delta(role="assistant", content=""))
        async for step in self.run(generation):
            if step is None:
                yield None
            elif step.text or step.finish_reason:
                yield chunk(Delta(content=step.text or None), step.finish_reason)
        if generation.include_usage:
            yield ChatCompletionChunk(
                id=generation.id,
                created=generation.created,
                model=self.model_name,
                choices=[],
                usage=generation.usage(),
            )

    async def completion_chunks(self, generation: Generation) -> AsyncIterator[CompletionResponse | None]:
        async for step in self.run(generation):
            if step is None:
                yield None
            elif step.text or step.finish_reason:
                yield CompletionResponse(
                    id=generation.id,
                    created=generation.created,
                    model=self.model_name,
                    choices=[CompletionChoice(text=step.text, finish_reason=step.finish_reason)],
                )
        if generation.include_usage:
            yield CompletionResponse(
                id=generation.id,
                created=generation.created,
                model=self.model_name,
                choices=[],
                usage=generation.usage(),
            )

    async def chat_response(self, generation: Generation) -> ChatCompletionResponse:
        text, finish = await _drain(self.run(generation))
        return ChatCompletionResponse(
            id=generation.id,
            created=generation.created,
            model=self.model_name,
            choices=[ChatChoice(message=ResponseMessage(content=text), finish_reason=finish)],
            usage=generation.usage(),
        )

    async def completion_response(self, generation: Generation) -> CompletionResponse:
        text, finish = await _drain(self.run(generation))
        return CompletionResponse(
            id=generation.id,
            created=generation.created,
            model=self.model_name,
            choices=[CompletionChoice(text=text, finish_reason=finish)],
            usage=generation.usage(),
        )


async def _drain(steps: AsyncIterator[StepOutput | None]) -> tuple[str, str]:
    parts, finish = [], "stop"
    async for step in steps:
        if step is None:
            continue
        parts.append(step.text)
        finish = step.finish_reason or finish
    return "".join(parts), finish
