"""OpenAI API shapes: requests, responses, streaming chunks and errors, named and ordered like the spec.

Requests reject what they do not implement: a parameter outside the spec, or one of the spec's that
q8chat does not support set to anything but its no-op value, is a 400 naming the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

# Spec parameters q8chat does not implement, with the values that ask for nothing (accepted, dropped).
NOT_IMPLEMENTED_CHAT: dict[str, tuple] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}
NOT_IMPLEMENTED_COMPLETION: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
}


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _drop_no_op_parameters(data: Any, table: dict[str, tuple]) -> Any:
    if not isinstance(data, dict):
        return data
    for name, no_ops in table.items():
        if name in data:
            if data[name] not in no_ops:
                raise UnsupportedParameter(
                    name, f"'{name}' is not supported by this server (accepted only as {', '.join(map(repr, no_ops))})"
                )
            data = {k: v for k, v in data.items() if k != name}
    return data


# Requests are strict, as OpenAI's schema is: "4" is no integer, "yes" no boolean, 1 no string.
STRICT = ConfigDict(extra="forbid", strict=True)
INT64 = (-(2**63), 2**63 - 1)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_template_message(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions."""

    model_config = STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    not_implemented: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def parse(cls, data: Any):
        """Validate a decoded JSON body; spec parameters this server lacks raise ``UnsupportedParameter``."""
        return cls.model_validate(_drop_no_op_parameters(data, cls.not_implemented))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    not_implemented: ClassVar[dict[str, tuple]] = NOT_IMPLEMENTED_CHAT

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


NonEmpty = Annotated[str, Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # one prompt (batch size 1), as a string or a list of one
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)

    not_implemented: ClassVar[dict[str, tuple]] = NOT_IMPLEMENTED_COMPLETION

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        return value[0] if isinstance(value, list) else value

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """Only the fields a chunk carries: the first has the role, the others just content."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and the streaming chunks of ``/v1/completions`` (same object type)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "q8chat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
