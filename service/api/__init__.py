"""The HTTP API (Litestar) over the engine: SPEC sections 6 and 7."""

from service.api.app import create_app

__all__ = ["create_app"]
