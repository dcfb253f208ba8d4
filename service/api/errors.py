"""The one place where failures become HTTP answers (JSON with a ``detail``).

Domain errors (``service.commands``) know nothing of HTTP; they are mapped here:
unknown job/user/config 404, wrong state and conflicts 409, not allowed 403, invalid
values 422, a configs directory the server cannot use 503, a job's output log replaced by
something else 409. Litestar's own errors keep their status, except that validation of a
body, query or path value is a 422 and a body that is not JSON a 400. Anything unexpected
is logged with its traceback and answered 500 without internals.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from events.log import LogError
from service.api.auth import Unauthenticated
from service.api.models import ErrorBody
from service.api.request_id import REQUEST_ID_KEY
from service.commands import (
    Conflict,
    DomainError,
    InvalidRequest,
    NotAllowed,
    UnknownConfig,
    UnknownJob,
    UnknownUser,
    WrongState,
)
from service.configs import ConfigsUnavailable
from service.engine import EngineUnavailable
from service.executors.run_files import NotTheJobsOutput

__all__ = ["EXCEPTION_HANDLERS", "DOMAIN_STATUS", "error_responses", "REQUEST_ID_KEY",
           "MAX_BODY_BYTES", "MalformedBody"]

log = structlog.get_logger("gpuyard.api")

MAX_BODY_BYTES = 1024 * 1024
CLIENT_GONE = "client disconnected prematurely"  # Litestar's words for a body cut short


class MalformedBody(Exception):
    """A request body that is not JSON (400), and why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


DOMAIN_STATUS: dict[type[DomainError], int] = {
    UnknownJob: 404,
    UnknownUser: 404,
    UnknownConfig: 404,
    ConfigsUnavailable: 503,
    WrongState: 409,
    Conflict: 409,
    NotAllowed: 403,
    InvalidRequest: 422,
}

_DESCRIPTIONS = {
    400: "Malformed request (a body that is not JSON, say)",
    401: "No valid bearer token (once a user exists)",
    403: "Your level does not allow this",
    404: "Unknown job, user or config",
    409: "The job or user is in the wrong state for this, or the request conflicts",
    413: "Request body larger than 1 MiB",
    422: "Invalid values",
    503: ("The event log could not be written, or the configs directory cannot be used; "
          "nothing was changed"),
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error statuses a route can answer (400, 401 and 422 always:
    any request may be malformed, any ``/api`` route may need a token, and any parameter
    may be invalid; without 400 here Litestar documents a body of its own for it)."""
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[code],
                           generate_examples=False)
        for code in sorted({400, 401, 422, *codes})
    }


def _answer(request: Request[Any, Any, Any], status: int, detail: str,
            extra: list[dict[str, Any]] | None = None,
            headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    if status >= 500:
        log.error("request_failed", status=status, detail=detail, path=request.url.path)
    elif status not in (401, 404):
        log.info("request_refused", status=status, detail=detail, path=request.url.path)
    return Response(ErrorBody(status_code=status, detail=detail, extra=extra),
                    status_code=status, headers=headers)


def _domain(request: Request[Any, Any, Any], exc: DomainError) -> Response[ErrorBody]:
    status = next((code for cls, code in DOMAIN_STATUS.items() if isinstance(exc, cls)), 422)
    return _answer(request, status, exc.detail)


def _unauthenticated(request: Request[Any, Any, Any], exc: Unauthenticated) -> Response[ErrorBody]:
    return _answer(request, 401, exc.detail, headers={"www-authenticate": "Bearer"})


def _where(item: dict[str, Any]) -> str:
    key, source = item.get("key"), item.get("source")
    source = getattr(source, "value", source)  # Litestar's ParamType enum
    if source == "body" and key in (None, "data"):
        return "body"
    if source:
        return f"{key} ({source})"
    return str(key)


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    extra = exc.extra if isinstance(exc.extra, list) else None
    if not extra:
        return _answer(request, HTTP_422_UNPROCESSABLE_ENTITY, f"invalid request: {exc.detail}")
    for item in extra:
        if item.get("key") == "data" and item.get("message") == "'data'":
            return _answer(request, HTTP_400_BAD_REQUEST,
                           "this request needs a JSON body (Content-Type: application/json)")
    problems = "; ".join(f"{_where(item)}: {item.get('message')}" for item in extra)
    return _answer(request, HTTP_422_UNPROCESSABLE_ENTITY, f"invalid request: {problems}",
                   extra=[{"key": item.get("key"),
                           "source": getattr(item.get("source"), "value", item.get("source")),
                           "message": item.get("message")} for item in extra])


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    if isinstance(exc, ValidationException):
        return _validation(request, exc)
    status = exc.status_code
    detail = exc.detail
    if status == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        detail = f"the request body is larger than {MAX_BODY_BYTES // 1024 // 1024} MiB"
    elif status == HTTP_400_BAD_REQUEST and "malformed" in detail.lower():
        return _malformed(request, MalformedBody(detail))
    elif detail == CLIENT_GONE:  # the client's doing, and nobody is left to read the answer
        log.info("client_disconnected", path=request.url.path)
        return Response(ErrorBody(status_code=HTTP_400_BAD_REQUEST, detail=detail),
                        status_code=HTTP_400_BAD_REQUEST)
    elif status >= 500:
        log.error("http_error", status=status, detail=detail, path=request.url.path)
        detail = "internal error"
    return _answer(request, status, detail, headers=exc.headers)


def _malformed(request: Request[Any, Any, Any], exc: MalformedBody) -> Response[ErrorBody]:
    return _answer(request, HTTP_400_BAD_REQUEST, f"malformed JSON body: {exc.why}")


def _msgspec(request: Request[Any, Any, Any], exc: msgspec.ValidationError) -> Response[ErrorBody]:
    return _answer(request, HTTP_422_UNPROCESSABLE_ENTITY, f"invalid request: {exc}")


def _replaced(request: Request[Any, Any, Any], exc: NotTheJobsOutput) -> Response[ErrorBody]:
    return _answer(request, HTTP_409_CONFLICT,
                   f"{exc}; something in the job's directory replaced it")


def _unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    detail = str(exc) if isinstance(exc, EngineUnavailable) else (
        "the event log cannot be read right now; try again")
    return _answer(request, HTTP_503_SERVICE_UNAVAILABLE, detail)


def _recursion(request: Request[Any, Any, Any], exc: RecursionError) -> Response[ErrorBody]:
    # msgspec gives up on a body nested deeper than it will decode; Litestar passes that
    # on as it is (it maps only DecodeError to a 400)
    if "deserializing" in str(exc):
        return _malformed(request, MalformedBody("nested too deeply"))
    return _internal(request, exc)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled_error", path=request.url.path, error=repr(exc))
    request_id = request.scope.get(REQUEST_ID_KEY)  # type: ignore[call-overload]
    return _answer(request, HTTP_500_INTERNAL_SERVER_ERROR,
                   f"internal error (request id {request_id}); the server log has the details")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    DomainError: _domain,
    Unauthenticated: _unauthenticated,
    HTTPException: _http,
    MalformedBody: _malformed,
    msgspec.ValidationError: _msgspec,
    NotTheJobsOutput: _replaced,
    EngineUnavailable: _unavailable,
    LogError: _unavailable,
    RecursionError: _recursion,
    Exception: _internal,
}
