"""The engine's steps of one choice as OpenAI's shapes: content deltas with tool calls cut out, log
probabilities, finish reasons; whole or as stream chunks."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from server.engine.engine import StepOutput
from server.engine.sampling import TokenLogprobs
from server.service.generation import ToolCalling
from server.service.protocol import (
    ChatChoice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from server.service.tools import ParsedCall, ToolCallStream, split_calls


class TokenTexts:
    """A token's text and its bytes. A byte-level BPE token (GPT-2's alphabet: SmolLM2, Llama 3) may be part
    of a character; its bytes are its own, not the replacement character's."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}

    def of(self, token: int) -> tuple[str, list[int]]:
        if (known := self._known.get(token)) is None:
            known = self._known[token] = self._text_and_bytes(token)
        return known

    def _text_and_bytes(self, token: int) -> tuple[str, list[int]]:
        text = self._tokenizer.decode([token])
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and all(character in _byte_decoder() for character in piece):
            raw = bytes(_byte_decoder()[character] for character in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        return text, list(text.encode("utf-8"))

    def entry(self, scored: TokenLogprobs) -> TokenLogprob:
        token, raw = self.of(scored.token)
        top = [TopLogprob(token=self.of(i)[0], logprob=lp, bytes=self.of(i)[1]) for i, lp in scored.top]
        return TokenLogprob(token=token, logprob=scored.logprob, bytes=raw, top_logprobs=top)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character alphabet, inverted: printable bytes stand for themselves, the others for
    characters from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


@dataclass
class ChatChoiceStream:
    """One choice, step by step, as stream deltas."""

    index: int
    texts: TokenTexts
    tools: ToolCalling | None
    logprobs: bool
    _calls: ToolCallStream | None = None
    _sent_calls: int = 0

    def __post_init__(self) -> None:
        if self.tools is not None:
            self._calls = ToolCallStream(self.tools.format, set(self.tools.names))

    def step(self, step: StepOutput) -> tuple[Delta, ChoiceLogprobs | None, str | None] | None:
        """The delta, log probabilities and finish reason of a step; None when it releases nothing yet."""
        text, calls = (step.text, []) if self._calls is None else self._calls.feed(step.text)
        finish = step.finish_reason
        if finish is not None and self._calls is not None:
            text += self._calls.finish()
            if self._calls.calls and finish != "length":  # an answer cut short says so, calls or not
                finish = "tool_calls"
        deltas = [
            ToolCallDelta(
                index=self._sent_calls + i, id=c.id, function=FunctionCallDelta(name=c.name, arguments=c.arguments)
            )
            for i, c in enumerate(calls)
        ]
        self._sent_calls += len(deltas)
        logprobs = (
            ChoiceLogprobs(content=[self.texts.entry(step.logprobs)]) if self.logprobs and step.logprobs else None
        )
        if not (text or deltas or logprobs or finish):
            return None
        return Delta(content=text or None, tool_calls=deltas or None), logprobs, finish


@dataclass
class ChoiceAnswer:
    """One choice, drained: its text, log probabilities and finish reason."""

    index: int
    parts: list[str] = field(default_factory=list)
    scored: list[TokenLogprobs] = field(default_factory=list)
    finish: str = "stop"

    def add(self, step: StepOutput) -> None:
        self.parts.append(step.text)
        if step.logprobs is not None:
            self.scored.append(step.logprobs)
        self.finish = step.finish_reason or self.finish

    def chat(self, texts: TokenTexts, tools: ToolCalling | None, logprobs: bool) -> ChatChoice:
        content, calls, finish = "".join(self.parts), [], self.finish
        if tools is not None:
            content, calls = split_calls(content, tools.format, set(tools.names))
            finish = "tool_calls" if calls and finish != "length" else finish
        message = ResponseMessage(
            content=content or (None if calls else ""), tool_calls=[_tool_call(c) for c in calls] or None
        )
        scored = ChoiceLogprobs(content=[texts.entry(s) for s in self.scored]) if logprobs else None
        return ChatChoice(index=self.index, message=message, logprobs=scored, finish_reason=finish)

    def completion(self, texts: TokenTexts, logprobs: bool) -> CompletionChoice:
        return CompletionChoice(
            index=self.index,
            text="".join(self.parts),
            logprobs=completion_logprobs(texts, self.scored) if logprobs else None,
            finish_reason=self.finish,
        )


def completion_logprobs(texts: TokenTexts, scored: list[TokenLogprobs], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape: token texts, their log probabilities, the top ones by text, and where
    each token's text starts in the completion (from ``offset``)."""
    tokens = [texts.of(s.token)[0] for s in scored]
    starts = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{texts.of(i)[0]: lp for i, lp in s.top} for s in scored]
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[s.logprob for s in scored], top_logprobs=top, text_offset=starts
    )
