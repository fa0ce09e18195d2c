"""OpenAI API shapes: requests, responses, streaming chunks and errors, named and ordered like the spec.

Requests reject what they do not implement: a parameter outside the spec, or one of the spec's that
q8chat does not support set to anything but its no-op value, is a 400 naming the parameter. Structured
outputs (``response_format``), tools, log probabilities and ``n`` are implemented.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# Spec parameters q8chat does not implement, with the values that ask for nothing (accepted, dropped).
NOT_IMPLEMENTED_CHAT: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "functions": (None, []),
    "function_call": (None, "none"),
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
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
}


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class InvalidParameter(UnsupportedParameter):
    """A parameter of the spec whose value does not fit the rest of the request (a tool choice naming no tool)."""


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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message of the conversation: an assistant's may carry the tool calls it made (and no content), a
    ``tool`` message answers the call ``tool_call_id``."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _parts_of_its_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]
MAX_CHOICES = 16  # n: the choices are generated one after another, after one prefill


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
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    not_implemented: ClassVar[dict[str, tuple]] = NOT_IMPLEMENTED_CHAT

    @classmethod
    def parse(cls, data: Any):
        request = super().parse(data)
        request._check_consistent()
        return request

    def _check_consistent(self) -> None:
        """Checks across parameters, each a 400 naming the parameter at fault."""
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs needs logprobs: true")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise InvalidParameter("tools", "tools: two functions with one name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            name = self.tool_choice.function.name
            raise InvalidParameter("tool_choice", f"tool_choice names the function {name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise InvalidParameter("tool_choice", "tool_choice 'required' needs tools")

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls: tools given and a choice other than none."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def requires_tool_call(self) -> bool:
        """The answer must be tool calls: tool_choice required, or a named function."""
        return self.calls_tools and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    @property
    def json_format(self) -> bool:
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def constrained(self) -> bool:
        """Whether a grammar shapes the answer."""
        return self.requires_tool_call or self.json_format

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


NonEmpty = Annotated[str, Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # one prompt (batch size 1), as a string or a list of one
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(default=None, ge=0, le=5)

    not_implemented: ClassVar[dict[str, tuple]] = NOT_IMPLEMENTED_COMPLETION

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        return value[0] if isinstance(value, list) else value

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(BaseModel):
    """llama.cpp server's /tokenize: the text's tokens, special tokens in it parsed as such."""

    model_config = STRICT
    content: str
    add_special: bool = False  # the tokenizer's BOS (and what else it adds)
    with_pieces: bool = False


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    content: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallDelta


class Delta(BaseModel):
    """Only the fields a chunk carries: the first has the role, the others content or tool calls."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
