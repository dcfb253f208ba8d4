"""The envelope around an event: gapless seq, time, actor, ids, and the hash chain.

``hash = sha256(prev_hash || canonical bytes)`` where the canonical bytes are the
envelope fields and the event's data, as written by :func:`canonical_bytes`.
"""

from __future__ import annotations

import hashlib

from msgspec import Struct

from events.codec import canonical_json, encode_event
from events.types import AnyEvent

GENESIS_HASH = bytes(32)


class Recorded(Struct, frozen=True, kw_only=True):
    """An event as it stands in the log."""

    seq: int
    at: float
    actor: str
    correlation_id: str | None
    causation_id: int | None
    event: AnyEvent
    data: bytes
    hash: bytes

    @property
    def type(self) -> str:
        return self.event.__struct_config__.tag  # type: ignore[return-value]


def canonical_bytes(
    seq: int,
    at: float,
    type_: str,
    actor: str,
    correlation_id: str | None,
    causation_id: int | None,
    data: bytes,
) -> bytes:
    """The bytes the hash chain covers: the envelope, a newline, the event data."""
    head = canonical_json([seq, at, type_, actor, correlation_id, causation_id])
    return head + b"\n" + data


def chain_hash(prev_hash: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(prev_hash + canonical).digest()


def seal(
    prev_hash: bytes,
    seq: int,
    at: float,
    actor: str,
    correlation_id: str | None,
    causation_id: int | None,
    event: AnyEvent,
) -> Recorded:
    """Wrap an event in its envelope and link it to the chain."""
    at += 0.0  # -0.0 becomes 0.0, as SQLite stores it: the hash covers what is stored
    data = encode_event(event)
    tag: str = event.__struct_config__.tag  # type: ignore[assignment]
    digest = chain_hash(
        prev_hash, canonical_bytes(seq, at, tag, actor, correlation_id, causation_id, data)
    )
    return Recorded(
        seq=seq,
        at=at,
        actor=actor,
        correlation_id=correlation_id,
        causation_id=causation_id,
        event=event,
        data=data,
        hash=digest,
    )
