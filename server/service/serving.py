"""Between the OpenAI protocol and the engine: prompts, grammars, the queue, cancellation, chunks.

Every request becomes one stream of protocol chunks; a non-streaming request drains the same stream.
Validation, tokenization, grammar compilation and the context-length and queue checks all happen in
``prepare``, before a response starts, so their errors can still carry a proper HTTP status; the slow parts
run off the event loop. A request's ``n`` choices run one after another, the prompt's KV cache reused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from server.engine.batching import DONE, Batcher, Job
from server.engine.engine import Engine, GenerationStats, StepOutput
from server.engine.grammar import GrammarError, Grammars
from server.engine.sampling import SamplingParams
from server.service.chunks import ChatChoiceStream, ChoiceAnswer, TokenTexts, completion_logprobs
from server.service.generation import Generation, ToolCalling
from server.service.metrics import Metrics
from server.service.prompter import Prompter
from server.service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    InvalidParameter,
    ModelCard,
    ModelList,
    NamedToolChoice,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
    UnsupportedParameter,
    new_id,
    now,
)
from server.service.scheduling import GenerationQueue

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    pass


class NotReady(RuntimeError):
    pass


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
        grammars: Grammars | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        self.engine = engine
        self.prompter = prompter
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.queue = GenerationQueue(max_queue, engine.slots)
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics or Metrics()
        self.metrics.watch_queue(self.queue)
        self.metrics.watch_prefix_cache(engine.prefix_cache)
        self.grammars = grammars  # None: constrained requests are refused
        self.texts = TokenTexts(prompter.tokenizer)
        self.batcher = Batcher(engine, prefill_chunk)

    def close(self, timeout: float) -> bool:
        """Let the engine's thread end once its jobs are finished with (up to ``timeout`` s): whether it ended."""
        return self.batcher.close(timeout)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=now())])

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        ids = await asyncio.to_thread(self.prompter.completion_ids, request.content, request.add_special)
        if not request.with_pieces:
            return TokenizeResponse(tokens=ids)
        return TokenizeResponse(tokens=[TokenPiece(id=i, piece=self.texts.of(i)[0]) for i in ids])

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        size = len(self.prompter.tokenizer)
        if unknown := [i for i in request.tokens if i >= size]:
            raise InvalidParameter("tokens", f"token ids {unknown[:5]} are outside the vocabulary of {size} tokens")
        return DetokenizeResponse(content=await asyncio.to_thread(self.prompter.tokenizer.decode, request.tokens))

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

    async def _prepare(
        self, prefix: str, tokenize, request: SamplingFields, stops: tuple[str, ...], **run
    ) -> Generation:
        """Tokenize on a worker thread (rendering and tokenizing a megabyte takes seconds, which the event loop,
        /health included, must not wait for), then admit the request to the queue."""
        self._check_model(request)
        ids = await asyncio.to_thread(tokenize)
        params = self._params(request, len(ids), stops)
        self.queue.admit()
        return Generation(new_id(prefix), ids, params, request.include_usage, self.queue, choices=request.n, **run)

    async def prepare_chat(self, request: ChatCompletionRequest) -> Generation:
        messages = [_template_message(m) for m in request.messages]
        tools = [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in request.tools or ()]
        tools = tools if request.calls_tools else None
        grammar = await asyncio.to_thread(self._grammar, request) if request.constrained else None
        calling = ToolCalling(self.prompter.tool_format, frozenset(t["name"] for t in tools)) if tools else None
        return await self._prepare(
            "chatcmpl",
            lambda: self.prompter.chat_ids(messages, tools),
            request,
            self.prompter.template.stop,
            grammar=grammar,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            tools=calling,
        )

    async def prepare_completion(self, request: CompletionRequest) -> Generation:
        return await self._prepare(
            "cmpl", lambda: self._completion_ids(request.prompt), request, (), logprobs=request.logprobs
        )

    def _completion_ids(self, prompt: str) -> list[int]:
        """A raw prompt's ids; some text (control characters) makes no token, which no model can continue."""
        if ids := self.prompter.completion_ids(prompt):
            return ids
        raise InvalidParameter("prompt", "the prompt makes no tokens: write some text the tokenizer keeps")

    def _grammar(self, request: ChatCompletionRequest) -> str:
        """The grammar of a response format, or of the tool calls a tool choice requires."""
        forced, shaped = request.requires_tool_call, request.json_format
        param = "tool_choice" if forced else "response_format"
        if self.grammars is None:
            raise UnsupportedParameter(param, f"'{param}' needs constrained decoding, which this server does not run")
        if forced and shaped:
            raise UnsupportedParameter(param, "a required tool call and a response_format cannot both shape the answer")
        try:
            if forced:
                named = request.tool_choice.function.name if isinstance(request.tool_choice, NamedToolChoice) else None
                functions = {
                    t.function.name: t.function.parameters for t in request.tools if named in (None, t.function.name)
                }
                fmt = self.prompter.tool_format
                return self.grammars.tool_calls(
                    functions, request.parallel_tool_calls and named is None, fmt.call_begin, fmt.call_end
                )
            if request.response_format.type == "json_object":
                return self.grammars.json_schema({"type": "object"})
            return self.grammars.json_schema(request.response_format.json_schema.json_schema)
        except GrammarError as exc:
            what = "the tools' parameter schemas" if forced else "the JSON schema"
            raise UnsupportedParameter(param, f"{what} cannot be enforced: {exc}") from None

    # -- running -------------------------------------------------------------------------------
    async def run(self, generation: Generation) -> AsyncIterator[tuple[int, StepOutput] | None]:
        """Wait for the turn, then yield the engine's steps, each with its choice; ``None`` is a heartbeat,
        yielded after ``heartbeat_s`` without a step (waiting in line, or a long prefill). Closing this iterator early
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

        def choice(index: int):
            stats = GenerationStats()
            generation.stats.append(stats)
            matcher = self.grammars.matcher(generation.grammar) if generation.grammar else None
            return generation.params_of(index), stats, matcher

        def emit(item) -> None:  # on the batcher's thread
            if isinstance(item, Exception):
                log.error("generation %s failed", generation.id, exc_info=item)
            loop.call_soon_threadsafe(steps.put_nowait, item)
            if item is DONE:  # the slot is free: the next in line may run
                loop.call_soon_threadsafe(self.queue.release)

        job = Job(generation.prompt_ids, choice, emit, cancel.is_set, generation.choices, generation.logprobs)
        try:
            self.batcher.submit(job)
        except BaseException:
            self.queue.release()
            raise
        last = None
        try:
            while True:
                try:  # a timeout scope, not wait_for: no task of its own for every token
                    async with asyncio.timeout(self.heartbeat_s):
                        item = await steps.get()
                except TimeoutError:
                    yield None
                    continue
                if item is DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                self._observe_token(generation, last)
                last = time.perf_counter()
                generation.finish_reason = item[1].finish_reason
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
        usage = generation.usage()
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.cached_prompt_tokens.inc(usage.prompt_tokens_details.cached_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)

    async def chat_chunks(self, generation: Generation) -> AsyncIterator[ChatCompletionChunk | None]:
        """The chunks of a streamed chat completion; ``None`` is a heartbeat (an SSE comment). Each choice
        begins with a chunk carrying the role."""

        def chunk(choices: list[ChunkChoice], usage=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=generation.id, created=generation.created, model=self.model_name, choices=choices, usage=usage
            )

        logprobs = generation.logprobs is not None
        streams: dict[int, ChatChoiceStream] = {}
        yield chunk([ChunkChoice(index=0, delta=Delta(role="assistant", content=""))])
        async for item in self.run(generation):
            if item is None:
                yield None
                continue
            index, step = item
            if index not in streams:
                streams[index] = ChatChoiceStream(index, self.texts, generation.tools, logprobs)
                if index:
                    yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
            if (out := streams[index].step(step)) is not None:
                delta, scored, finish = out
                yield chunk([ChunkChoice(index=index, delta=delta, logprobs=scored, finish_reason=finish)])
        if generation.include_usage:
            yield chunk([], usage=generation.usage())

    async def completion_chunks(self, generation: Generation) -> AsyncIterator[CompletionResponse | None]:
        def chunk(choices: list[CompletionChoice], usage=None) -> CompletionResponse:
            return CompletionResponse(
                id=generation.id, created=generation.created, model=self.model_name, choices=choices, usage=usage
            )

        offsets: dict[int, int] = {}
        async for item in self.run(generation):
            if item is None:
                yield None
                continue
            index, step = item
            if step.text or step.finish_reason or step.logprobs:
                scored = None
                if generation.logprobs is not None and step.logprobs is not None:
                    scored = completion_logprobs(self.texts, [step.logprobs], offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(step.text)
                yield chunk(
                    [CompletionChoice(index=index, text=step.text, logprobs=scored, finish_reason=step.finish_reason)]
                )
        if generation.include_usage:
            yield chunk([], usage=generation.usage())

    async def _answers(self, generation: Generation) -> list[ChoiceAnswer]:
        answers = [ChoiceAnswer(index) for index in range(generation.choices)]
        async for item in self.run(generation):
            if item is not None:
                answers[item[0]].add(item[1])
        return answers

    async def chat_response(self, generation: Generation) -> ChatCompletionResponse:
        answers = await self._answers(generation)
        logprobs = generation.logprobs is not None
        return ChatCompletionResponse(
            id=generation.id,
            created=generation.created,
            model=self.model_name,
            choices=[a.chat(self.texts, generation.tools, logprobs) for a in answers],
            usage=generation.usage(),
        )

    async def completion_response(self, generation: Generation) -> CompletionResponse:
        answers = await self._answers(generation)
        return CompletionResponse(
            id=generation.id,
            created=generation.created,
            model=self.model_name,
            choices=[a.completion(self.texts, generation.logprobs is not None) for a in answers],
            usage=generation.usage(),
        )


def _template_message(message: ChatMessage) -> dict:
    """A message as templates and the tool format read it: plain text, a developer speaking as the system."""
    out = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        out["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out
