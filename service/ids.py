"""Random identifiers and secrets: job ids, API tokens, token ids, request ids."""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = ["new_job_id", "new_token", "new_token_id", "new_request_id", "token_hash"]

TOKEN_PREFIX = "gy_"


def new_job_id() -> str:
    """12 lowercase base32 characters (60 random bits), url-safe (SPEC section 2)."""
    return base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()


def new_token() -> str:
    """A bearer token: shown once at creation, stored only as :func:`token_hash`."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_token_id() -> str:
    """A token's public id (used to revoke it); random, not derived from the token."""
    return secrets.token_hex(8)


def new_request_id() -> str:
    return secrets.token_hex(8)


def token_hash(token: str) -> str:
    """The only form in which a token is stored: sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
