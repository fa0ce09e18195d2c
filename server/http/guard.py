"""API keys, request counts and the access log, around every request."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import Request

from server.http.errors import ApiError, error_response
from server.service.metrics import Metrics

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/health")  # the page must load before a key can be typed into it


def authorized(request: Request, keys: tuple[str, ...]) -> bool:
    supplied = request.headers.get("x-api-key") or ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        supplied = token.strip()
    return any(hmac.compare_digest(supplied.encode(), key.encode()) for key in keys)


def generation_log(generation) -> dict:
    usage = generation.usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "finish_reason": generation.finish_reason,
        "ttft_s": round(generation.first_token_s, 4) if generation.first_token_s is not None else None,
    }


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
            if (
                self.api_keys
                and scope["path"] not in OPEN_PATHS
                and scope["method"] != "OPTIONS"
                and not authorized(request, self.api_keys)
            ):
                await error_response(
                    ApiError(
                        401,
                        "Invalid or missing API key (send 'Authorization: Bearer KEY').",
                        type="authentication_error",
                        code="invalid_api_key",
                    )
                )(scope, receive, record_status)
            else:
                await self.app(scope, receive, record_status)
        finally:
            generation = scope["state"].get("generation")
            if generation is not None:
                generation.abandon()  # a response that never ran must not keep its queue place
            route = scope.get("route")
            self.metrics.requests.labels(endpoint=getattr(route, "path", "unmatched"), status=str(status)).inc()
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "http": {
                        "id": generation.id if generation else None,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_s": round(time.perf_counter() - start, 4),
                        **(generation_log(generation) if generation else {}),
                    }
                },
            )
