"""The HTTP layer's routes: chat and text completions (JSON or SSE), models, health, metrics and the chat page.
``create_app`` builds it around a ``ServiceSlot`` that holds the chat service once the model is loaded
(until then: 503). Errors (``errors``), bodies (``body``), keys and the access log (``guard``) and the
published API description (``openapi``) have modules of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.http.body import read_json
from server.http.errors import ApiError, as_api_error, error_response
from server.http.guard import GuardAndLog
from server.http.openapi import Health, document
from server.service.metrics import Metrics
from server.service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)
from server.service.serving import ChatService, NotReady


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


def create_app(slot: ServiceSlot, http: HttpSettings = HttpSettings()) -> FastAPI:
    app = FastAPI(title="q8chat", docs_url=None, redoc_url=None)
    document(app, lambda: slot.service.model_name if slot.service is not None else None)
    metrics = slot.metrics
    app.add_middleware(GuardAndLog, metrics=metrics, api_keys=http.api_keys)
    if http.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(http.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
        )

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
            return JSONResponse(Health(status="loading").model_dump(), status_code=503)
        return JSONResponse(Health(status="ok", model=slot.service.model_name).model_dump())

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
            return StreamingResponse(
                sse_stream(stream(service)(generation)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await until_disconnected(request, whole(service)(generation))
        except Exception as exc:
            return error_response(as_api_error(exc))
        return JSONResponse(result.model_dump(exclude_none=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(
            request, ChatCompletionRequest, lambda s: s.prepare_chat, lambda s: s.chat_chunks, lambda s: s.chat_response
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(
            request,
            CompletionRequest,
            lambda s: s.prepare_completion,
            lambda s: s.completion_chunks,
            lambda s: s.completion_response,
        )

    async def tokens(request: Request, model: type, work) -> JSONResponse:
        try:
            service = slot.get()
            body = model.model_validate(await read_json(request, http.max_body_bytes, http.body_timeout_s))
            return JSONResponse((await work(service)(body)).model_dump())
        except Exception as exc:
            return error_response(as_api_error(exc))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        return await tokens(request, TokenizeRequest, lambda s: s.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        return await tokens(request, DetokenizeRequest, lambda s: s.detokenize)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("server.http").joinpath("static/index.html").read_text("utf-8"))

    return app
