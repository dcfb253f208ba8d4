"""Request bodies are JSON, so their values must have the types the API declares.

Litestar converts a handler's arguments in lax mode (query strings need it: everything
in them is a string), which would also let a JSON body say ``"max_concurrent": "3"`` or
``"enable_fair_share": "true"``. This hook checks the body alone, strictly, against the
handler's declared model before the handler runs: a wrong type is a 422 naming the field.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from service.commands import InvalidRequest

__all__ = ["check_body_types"]


async def check_body_types(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: refuse a body whose values have the wrong JSON types."""
    declared = request.route_handler.parsed_fn_signature.parameters.get("data")
    if declared is None:
        return None
    try:
        body = await request.json()
    except Exception:  # malformed or too large: Litestar's own parsing answers 400 / 413
        return None
    if body is None:  # no body at all: the handler's own parsing answers 400
        return None
    try:
        msgspec.convert(body, declared.annotation, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request body: {exc}") from None
    return None
