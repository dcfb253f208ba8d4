"""A request id per HTTP call: bound in the structlog context and echoed as a header.

The id is the caller's ``X-Request-ID`` when it is a short, plain token, else a new
random one. Handlers pass it to the engine as the ``correlation_id`` of the events the
call causes, so a log line, a response and an audit record can be matched up.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.ids import new_request_id

__all__ = ["REQUEST_ID_KEY", "request_id_middleware", "echo_request_id", "request_id_of"]

REQUEST_ID_KEY = "gpuyard.request_id"
_HEADER = b"x-request-id"
_ACCEPTABLE = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


def _incoming(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == _HEADER:
            return value.decode("ascii") if _ACCEPTABLE.match(value) else None
    return None


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request_id = _incoming(scope) or new_request_id()
            scope[REQUEST_ID_KEY] = request_id  # type: ignore[literal-required]
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id)
        await app(scope, receive, send)

    return middleware


async def echo_request_id(message: Message, scope: Scope) -> None:
    """``before_send`` hook: every response, errors included, carries ``X-Request-ID``."""
    if message["type"] == "http.response.start":
        request_id = scope.get(REQUEST_ID_KEY)  # type: ignore[call-overload]
        if request_id:
            headers = list(message.get("headers", ()))
            headers.append((_HEADER, request_id.encode("ascii")))
            message["headers"] = headers  # type: ignore[typeddict-unknown-key]


def request_id_of(connection: Any) -> str | None:
    return connection.scope.get(REQUEST_ID_KEY)  # type: ignore[no-any-return]
