"""Request bodies: read with limits on size and time, parsed as strict JSON."""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import Request

from server.http.errors import ApiError

JSON_MEDIA_TYPE = re.compile(r"application/([\w.-]+\+)?json")
MAX_JSON_DEPTH = 64  # OpenAI requests nest a few levels; a JSON schema in a request, a few more


async def read_json(request: Request, limit: int, timeout_s: float) -> object:
    """The request's JSON body. It must say it is JSON (or say nothing), arrive within ``timeout_s`` of
    each previous part, fit ``limit`` bytes, be UTF-8 and be plain JSON: no NaN or Infinity, no string
    that is not Unicode text (a lone surrogate), no nesting deeper than ``MAX_JSON_DEPTH``."""
    media_type, _, parameters = request.headers.get("content-type", "application/json").partition(";")
    charset = parameters.strip().lower().removeprefix("charset=").strip('"') if "charset" in parameters else "utf-8"
    if not JSON_MEDIA_TYPE.fullmatch(media_type.strip().lower()) or charset not in ("utf-8", "utf8"):
        raise ApiError(
            415,
            "Send the request body as JSON in UTF-8 (Content-Type: application/json).",
            code="unsupported_media_type",
        )
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
            raise ApiError(
                408, f"The request body did not arrive: nothing for {timeout_s:g} s.", code="request_timeout"
            ) from None
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
        raise ApiError(
            400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json"
        ) from None
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
                raise ApiError(
                    400,
                    "A string in the JSON body is not Unicode text (a lone surrogate such as \\ud800).",
                    code="invalid_json",
                ) from None
