"""The HTTP layer: routes, SSE framing, OpenAI-shaped errors, API keys, CORS, metrics, access log.
``create_app`` builds it around a ``ServiceSlot`` that holds the chat service once the model is loaded
(until then: 503)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine import ContextLengthExceeded
from server.protocol import (ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse,
                             UnsupportedParameter)
from server.metrics import Metrics
from server.scheduling import QueueFull, ShuttingDown
from server.serving import ChatService, ModelNotFound, NotReady

log = logging.getLogger(__name__)


class ServiceSlot:
    """Where the composition root puts the service once the model is ready."""

    def __init__(self, service: ChatService | None = None, metrics: Metrics | None = None) -> None:
        self.service = service
        self.metrics = metrics or (service.metrics if service else Metrics())

    def get(self) -> ChatService:
        if self.service is None:
            raise NotReady("The model is still loading; retry shortly.")
        return self.service


@dataclass(frozen=True)
class HttpSettings:
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()


OPEN_PATHS = ("/", "/health")  # the page must load before a key can be typed into it


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, ErrorBody(message=message, type=type, param=param, code=code), headers


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error.body).model_dump(), status_code=error.status, headers=error.headers)


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p[:1].isupper())) or None
    message = f"{first['msg']}" + (f" (at '{param}')" if param else "")
    return ApiError(400, message, param=param.split(".")[0] if param else None)


def as_api_error(exc: Exception) -> ApiError:
    """Map the layers' exceptions to HTTP errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnsupportedParameter):
        return ApiError(400, str(exc), param=exc.param, code="unsupported_parameter")
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(exc, ClientDisconnect):  # nobody to answer; not a server error
        return ApiError(499, "Client closed the request.", code="client_closed_request")
    if isinstance(exc, (NotReady, ShuttingDown)):
        return ApiError(503, str(exc), type="service_unavailable", headers={"Retry-After": "5"})
    log.error("internal error: %r", exc, exc_info=exc)
    return ApiError(500, "The server had an internal error while processing the request.", type="server_error")


JSON_MEDIA_TYPE = re.compile(r"application/([\w.-]+\+)?json")
MAX_JSON_DEPTH = 64  # OpenAI requests nest a few levels; a JSON schema in a request, a few more


async def read_json(request: Request, limit: int, timeout_s: float) -> object:
    """The request's JSON body. It must say it is JSON (or say nothing), arrive within ``timeout_s`` of
    each previous part, fit ``limit`` bytes, be UTF-8 and be plain JSON: no NaN or Infinity, no string
    that is not Unicode text (a lone surrogate), no nesting deeper than ``MAX_JSON_DEPTH``."""
    media_type, _, parameters = request.headers.get("content-type", "application/json").partition(";")
    charset = parameters.strip().lower().removeprefix("charset=").strip('"') if "charset" in parameters else "utf-8"
    if not JSON_MEDIA_TYPE.fullmatch(media_type.strip().lower()) or charset not in ("utf-8", "utf8"):
        raise ApiError(415, "Send the request body as JSON in UTF-8 (Content-Type: application/json).",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    body = bytearray()
    parts = aiter(request.stream())
    while True:
        try:
            part = await asyncio.wait_for(anext(parts), timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive: nothing for {timeout_s:g} s.",
                           code="request_timeout") from None
        body += part
        if len(body) > limit:
            raise ApiError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
    return parse_json(bytes(body))


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> object:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from None
    _check_values(data)
    return data


def _check_values(data: object) -> None:
    """Walk the parsed body (without recursion) for what ``json.loads`` lets through."""
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "A string in the JSON body is not Unicode text (a lone surrogate such as "
                                    "\\ud800).", code="invalid_json") from None


def _sse(item: BaseModel | None) -> str:
    """A data event, or for None (a heartbeat) a comment that keeps proxies and clients from timing out."""
    return ": keep-alive\n\n" if item is None else f"data: {item.model_dump_json()}\n\n"


async def sse_stream(chunks: AsyncIterator[BaseModel | None]) -> AsyncIterator[str]:
    try:
        async for item in chunks:
            yield _sse(item)
    except Exception as exc:  # headers are sent: report the failure in the stream itself
        yield f"data: {ErrorResponse(error=as_api_error(exc).body).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def until_disconnected(request: Request, work: Awaitable) -> object:
    """Await ``work``, cancelling it if the client goes away (which stops its generation)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "Client closed the request.", code="client_closed_request")


def authorized(request: Request, keys: tuple[str, ...]) -> bool:
    supplied = request.headers.get("x-api-key") or ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        supplied = token.strip()
    return any(hmac.compare_digest(supplied.encode(), key.encode()) for key in keys)


def generation_log(generation) -> dict:
    s = generation.stats
    return {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
            "completion_tokens": s.completion_tokens, "finish_reason": generation.finish_reason,
            "ttft_s": round(generation.first_token_s, 4) if generation.first_token_s is not None else None}


class GuardAndLog:
    """Pure ASGI (it must not buffer or detach streaming bodies): API keys, then, once the whole
    response is sent, one request count and one access-log line (never with headers or keys)."""

    def __init__(self, app, metrics: Metrics, api_keys: tuple[str, ...]) -> None:
        self.app, self.metrics, self.api_keys = app, metrics, api_keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        scope.setdefault("state", {})["generation"] = None
        request = Request(scope)
        status = 500

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_keys and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS" \
                    and not authorized(request, self.api_keys):
                await error_response(ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                                              type="authentication_error", code="invalid_api_key"))(
                    scope, receive, record_status)
            else:
                await self.app(scope, receive, record_status)
        finally:
            generation = scope["state"].get("generation")
            if generation is not None:
                generation.abandon()  # a response that never ran must not keep its queue place
            route = scope.get("route")
            self.metrics.requests.labels(endpoint=getattr(route, "path", "unmatched"), status=str(status)).inc()
            log.info("%s %s %d", scope["method"], scope["path"], status, extra={"http": {
                "id": generation.id if generation else None, "method": scope["method"], "path": scope["path"],
                "status": status, "duration_s": round(time.perf_counter() - start, 4),
                **(generation_log(generation) if generation else {})}})


def create_app(slot: ServiceSlot, http: HttpSettings = HttpSettings()) -> FastAPI:
    app = FastAPI(title="q8chat", docs_url=None, redoc_url=None)
    metrics = slot.metrics
    app.add_middleware(GuardAndLog, metrics=metrics, api_keys=http.api_keys)
    if http.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(http.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])

    @app.exception_handler(Exception)
    async def handle_error(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"No route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, message, code=code, headers=exc.headers))  # 405: Allow

    @app.get("/health")
    async def health() -> JSONResponse:
        if slot.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": slot.service.model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(slot.get().models().model_dump())

    async def complete(request: Request, model: type, prepare, stream, whole) -> Response:
        try:
            service = slot.get()
            body = model.parse(await read_json(request, http.max_body_bytes, http.body_timeout_s))
            generation = await prepare(service)(body)
            request.state.generation = generation
        except Exception as exc:
            return error_response(as_api_error(exc))
        if body.stream:
            return StreamingResponse(sse_stream(stream(service)(generation)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await until_disconnected(request, whole(service)(generation))
        except Exception as exc:
            return error_response(as_api_error(exc))
        return JSONResponse(result.model_dump(exclude_none=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatCompletionRequest, lambda s: s.prepare_chat, lambda s: s.chat_chunks,
                              lambda s: s.chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, lambda s: s.prepare_completion,
                              lambda s: s.completion_chunks, lambda s: s.completion_response)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("server").joinpath("static/index.html").read_text("utf-8"))

    return app
