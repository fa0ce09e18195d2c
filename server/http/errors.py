"""OpenAI-shaped errors: every exception of the layers below mapped to a status, a type and a code, in the
``{"error": {"message", "type", "param", "code"}}`` body OpenAI's clients read."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from server.engine.engine import ContextLengthExceeded
from server.service.protocol import ErrorBody, ErrorResponse, InvalidParameter, UnsupportedParameter
from server.service.scheduling import QueueFull, ShuttingDown
from server.service.serving import ModelNotFound, NotReady

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = (
            status,
            ErrorBody(message=message, type=type, param=param, code=code),
            headers,
        )


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error.body).model_dump(), status_code=error.status, headers=error.headers)


def _validation_error(exc: ValidationError) -> ApiError:
    """The first field's error. For a field that takes one of several types, pydantic reports each type it
    tried: the error of the type the value has (a list that is too long) says more than a type mismatch
    ("should be a valid string")."""
    errors = exc.errors()
    field = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    first = next((e for e in field if not e["type"].endswith("_type")), errors[0])
    # the path as the client wrote it: no model class names (TextPart) or union tags (list[constrained-str])
    param = (
        ".".join(str(p) for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and not p[:1].isupper()))
        or None
    )
    message = f"{first['msg']}" + (f" (at '{param}')" if param else "")
    return ApiError(400, message, param=param.split(".")[0] if param else None)


def as_api_error(exc: Exception) -> ApiError:
    """Map the layers' exceptions to HTTP errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnsupportedParameter):
        code = "invalid_value" if isinstance(exc, InvalidParameter) else "unsupported_parameter"
        return ApiError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, QueueFull):
        return ApiError(
            429, str(exc), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        )
    if isinstance(exc, ClientDisconnect):  # nobody to answer; not a server error
        return ApiError(499, "Client closed the request.", code="client_closed_request")
    if isinstance(exc, (NotReady, ShuttingDown)):
        return ApiError(503, str(exc), type="service_unavailable", headers={"Retry-After": "5"})
    log.error("internal error: %r", exc, exc_info=exc)
    return ApiError(500, "The server had an internal error while processing the request.", type="server_error")
