"""Request bodies are JSON, so their values must have the types the API declares.

Litestar converts a handler's arguments in lax mode (query strings need it: everything
in them is a string), which would also let a JSON body say ``"max_concurrent": "3"`` or
``"enable_fair_share": "true"``. This hook checks the body alone, strictly, against the
handler's declared model before the handler runs: a wrong type is a 422 naming the field.
A string that is not valid UTF-8 is a 400 here, since msgspec reports it as a
``UnicodeDecodeError`` that Litestar's own parsing would let through as a 500.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ClientException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

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
        # a typed decode stops at the first wrong value; malformed JSON after it is
        # still a 400 (Litestar's own parsing answers it), not a 422
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        raise InvalidRequest(f"invalid request body: {exc}") from None
    except msgspec.DecodeError:  # malformed JSON: Litestar's own parsing answers 400
        return None
    except UnicodeDecodeError:  # msgspec's (and so Litestar's) answer to bad bytes in a string
        raise ClientException(detail="malformed JSON body: a string in it is not valid "
                                     "UTF-8") from None
    return None
