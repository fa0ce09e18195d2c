"""The published API description (``/openapi.json``): the real request and response models, SSE streams, and
every error status a route can answer with, so client generators and fuzzers (``tests/test_fuzz_e2e.py``) can
use it. The routes read their bodies themselves (strict JSON, limits: ``body``), so FastAPI cannot see them:
each operation's request body and responses are declared here from the protocol's pydantic models."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or value, an unsupported parameter, context length exceeded",
    401: "Missing or invalid API key (when the server has keys)",
    404: "No such model",
    408: "The request body did not arrive in time",
    413: "The request body is too large",
    415: "The request body is not JSON in UTF-8",
    429: "Too many requests are waiting (Retry-After)",
    503: "The model is still loading, or the server is shutting down (Retry-After)",
}


class Health(BaseModel):
    status: str
    model: str | None = None


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*statuses: int) -> dict:
    return {str(status): {"description": ERRORS[status], "content": _json(ErrorResponse)} for status in statuses}


def _events(chunk: type[BaseModel]) -> dict:
    """One server-sent event of a stream: its ``data`` is a chunk as JSON (an error object if the generation
    fails after the stream began), and the last one is ``[DONE]``."""
    data = {
        "anyOf": [
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
            },
            {"const": "[DONE]"},
        ],
        "description": f"a {chunk.__name__} as JSON; an ErrorResponse if the generation failed; finally [DONE]",
    }
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


def _completion(request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    return {
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {
            "200": {
                "description": 'The completion; with "stream": true, server-sent events',
                "content": {**_json(response), "text/event-stream": {"schema": _events(chunk)}},
            },
            **_errors(400, 401, 404, 408, 413, 415, 429, 503),
        },
    }


OPERATIONS = {  # (path, method): what the route takes and answers
    ("/v1/chat/completions", "post"): _completion(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
    ("/v1/completions", "post"): _completion(CompletionRequest, CompletionResponse, CompletionResponse),
    ("/tokenize", "post"): {
        "requestBody": {"required": True, "content": _json(TokenizeRequest)},
        "responses": {
            "200": {"description": "The text's token ids", "content": _json(TokenizeResponse)},
            **_errors(400, 401, 408, 413, 415, 503),
        },
    },
    ("/detokenize", "post"): {
        "requestBody": {"required": True, "content": _json(DetokenizeRequest)},
        "responses": {
            "200": {"description": "The tokens' text", "content": _json(DetokenizeResponse)},
            **_errors(400, 401, 408, 413, 415, 503),
        },
    },
    ("/v1/models", "get"): {
        "responses": {"200": {"description": "The served model", "content": _json(ModelList)}, **_errors(401, 503)}
    },
    ("/health", "get"): {
        "responses": {
            "200": {"description": "Ready", "content": _json(Health)},
            "503": {"description": "The model is still loading", "content": _json(Health)},
        }
    },
    ("/metrics", "get"): {
        "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401),
        }
    },
    ("/", "get"): {
        "responses": {"200": {"description": "The chat page", "content": {"text/html": {"schema": {"type": "string"}}}}}
    },
}
MODELS = (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionChunk,
    CompletionRequest,
    CompletionResponse,
    TokenizeRequest,
    TokenizeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    ErrorResponse,
    Health,
)


def document(app: FastAPI, served_model: Callable[[], str | None]) -> None:
    """Serve the description above as the app's OpenAPI document. Once the model is loaded, requests name it
    (``model`` is an enum of its one name) and the document is built for good."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation" if model.__name__.endswith("Request") else "serialization") for model in MODELS],
            ref_template=REF,
        )
        schema.setdefault("components", {})["schemas"] = definitions = definitions["$defs"]
        for (path, method), operation in OPERATIONS.items():
            schema["paths"][path][method].update(operation)
        if (name := served_model()) is not None:
            for request in (ChatCompletionRequest, CompletionRequest):
                definitions[request.__name__]["properties"]["model"]["enum"] = [name]
            app.openapi_schema = schema
        return schema

    app.openapi = openapi
