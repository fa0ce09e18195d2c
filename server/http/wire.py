"""The errors uvicorn writes itself, before any route runs, in OpenAI's JSON shape: a request that h11 cannot
parse (a broken request line or header) got a text/plain 400."""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from server.service.protocol import ErrorBody, ErrorResponse


class JsonErrorsH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (``uvicorn.Config(http=...)``), its 400 for unparsable requests in JSON."""

    def send_400_response(self, msg: str) -> None:
        body = ErrorResponse(error=ErrorBody(message=msg, type="invalid_request_error", code="invalid_http_request"))
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]),
            h11.Data(data=body.model_dump_json().encode()),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
