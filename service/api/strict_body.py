"""Request bodies are JSON, so their values must have the types the API declares.

Litestar converts a handler's arguments in lax mode (query strings need it: everything
in them is a string), which would also let a JSON body say ``"max_concurrent": "3"`` or
``"enable_fair_share": "true"``. This hook checks the body alone, strictly, against the
handler's declared model before the handler runs: a wrong type is a 422 naming the field.
A body that is not JSON is a 400 here, including a string that is not valid UTF-8,
which msgspec reports as a ``UnicodeDecodeError`` that Litestar would let through as a 500.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from service.api.errors import MalformedBody
from service.commands import InvalidRequest

__all__ = ["check_body_types"]


_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _strict_decoder(annotation: Any) -> msgspec.json.Decoder[Any]:
    decoder = _DECODERS.get(annotation)
    if decoder is None:
        decoder = _DECODERS[annotation] = msgspec.json.Decoder(annotation, strict=True)
    return decoder


async def check_body_types(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: refuse a body whose values have the wrong JSON types."""
    declared = request.route_handler.parsed_fn_signature.parameters.get("data")
    if declared is None:
        return None
    try:
        body = await request.body()
    except RequestEntityTooLarge:
        raise  # also a chunked body, which announced no length: its 413 is the answer
    except Exception:  # the client went away: Litestar's own parsing answers
        return None
    if not body:  # no body at all: the handler's own parsing answers 400
        return None
    try:
        _strict_decoder(declared.annotation).decode(body)
    except msgspec.ValidationError as exc:
        # a typed decode stops at the first wrong value: a body that is malformed after
        # it is still a 400, not a 422
        _refuse_if_malformed(body)
        raise InvalidRequest(f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        _refuse_if_malformed(body)
    return None


def _refuse_if_malformed(body: bytes) -> None:
    """A body that is not JSON is a 400 (:class:`MalformedBody`), whatever else is wrong."""
    try:
        msgspec.json.decode(body)
    except msgspec.ValidationError:  # well-formed, with a number no value can hold: a 422
        return
    except msgspec.DecodeError as exc:
        raise MalformedBody(str(exc)) from None
    except UnicodeDecodeError:  # msgspec's answer to bad bytes inside a string
        raise MalformedBody("a string in it is not valid UTF-8") from None
