"""Random identifiers and secrets: job ids, API tokens, token ids, request ids.

Job ids and tokens come from the operating system's CSPRNG (``os.urandom``). Reading
it costs a system call, which on small virtual machines takes tens of microseconds, so
job ids draw from a 4 KiB buffer of it refilled as needed. Request ids only correlate
log lines with events: a random per-process prefix and a counter.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import threading

__all__ = ["new_job_id", "new_token", "new_token_id", "new_request_id", "token_hash"]

TOKEN_PREFIX = "gy_"
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648's alphabet, lower case


class _RandomBuffer:
    """Bytes of ``os.urandom``, read 4 KiB at a time and each handed out once."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._buffer = b""
        self._at = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._at + count > len(self._buffer):
                self._buffer = os.urandom(self._size)
                self._at = 0
            start = self._at
            self._at = start + count
            return self._buffer[start:start + count]


_RANDOM = _RandomBuffer()
_REQUEST_PREFIX = secrets.token_hex(3)
_REQUEST_COUNTER = itertools.count(1)


def new_job_id() -> str:
    """12 lowercase base32 characters (60 random bits), url-safe (SPEC section 2)."""
    bits = int.from_bytes(_RANDOM.take(8), "big") >> 4
    return "".join(_BASE32[(bits >> shift) & 31] for shift in range(0, 60, 5))


def new_token() -> str:
    """A bearer token: shown once at creation, stored only as :func:`token_hash`."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_token_id() -> str:
    """A token's public id (used to revoke it); random, not derived from the token."""
    return secrets.token_hex(8)


def new_request_id() -> str:
    """16 hex characters, unique within this process (a random prefix, then a count)."""
    return f"{_REQUEST_PREFIX}{next(_REQUEST_COUNTER) & 0xFFFFFFFFFF:010x}"


def token_hash(token: str) -> str:
    """The only form in which a token is stored: sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
