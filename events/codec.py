"""Canonical bytes for events, and upcasting of old shapes read from disk.

Stored ``data`` is the event encoded as JSON with every object's keys sorted, so the
bytes (and the hash chain over them) are the same whether they come from a Struct or
from a plain dict parsed out of an export.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec

from events.types import EVENT_TYPES, AnyEvent, Event

_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder(AnyEvent)
# One decoder per tag, for bytes whose type is known (the log stores it beside them): the
# union's decoder must find the "type" key first, and sorted keys put it near the end,
# so it reads most of every event twice.
_DECODERS = {tag: msgspec.json.Decoder(cls) for tag, cls in EVENT_TYPES.items()}
# A replay batch: ``[[seq, at, {"type": tag, ...event}], ...]`` with each event's tag
# written first (see ``EventLog.batches``), so the union picks its type at the first key.
_BATCH_DECODER = msgspec.json.Decoder(list[tuple[int, float, AnyEvent]])

Decoded = tuple[int, float, AnyEvent]  # (seq, at, event)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# tag -> function turning an old stored shape into the current one. Register an entry
# here when an event's shape changes incompatibly; stored bytes are never rewritten.
UPCASTERS: dict[str, Upcaster] = {}


def encode_event(event: Event) -> bytes:
    """The canonical bytes of an event (its ``type`` tag included)."""
    return _ENCODER.encode(event)


def canonical_json(value: object) -> bytes:
    """Encode any JSON-able value with sorted keys: the form the hash chain covers."""
    return _ENCODER.encode(value)


def decode_event(type_: str, data: bytes) -> AnyEvent:
    """Decode stored bytes into the current event Struct, upcasting old shapes."""
    upcast = UPCASTERS.get(type_)
    if upcast is None:
        decoder = _DECODERS.get(type_)
        if decoder is not None:
            try:
                return decoder.decode(data)  # type: ignore[no-any-return,return-value]
            except msgspec.DecodeError:
                pass  # not that type after all: the union decides (or names the error)
        return _DECODER.decode(data)
    raw = msgspec.json.decode(data)
    return msgspec.convert(upcast(raw), AnyEvent)  # type: ignore[arg-type]


def decode_batch(batch: bytes) -> list[Decoded]:
    """Decode a replay batch in one call. Raises ``msgspec.DecodeError`` when any event in
    it is not of the current shape (or names two types): the caller then reads those
    rows one by one through :func:`decode_event`, which upcasts or names the error.
    Never used while an upcaster is registered: an old shape may still decode here."""
    return _BATCH_DECODER.decode(batch)


def decoder_for(type_: str) -> Callable[[bytes], AnyEvent]:
    """:func:`decode_event` for many bytes stored under ``type_``, without its lookups.

    Where ``decode_event`` would fall back on the union (bytes not of ``type_`` after
    all), this raises ``msgspec.DecodeError``: the caller then asks ``decode_event``.
    """
    decoder = _DECODERS.get(type_)
    if decoder is None or type_ in UPCASTERS:
        return functools.partial(decode_event, type_)
    return decoder.decode  # type: ignore[no-any-return,return-value]
