"""The event vocabulary, its envelope and codec (pure), and the log (apsw)."""

from events.envelope import GENESIS_HASH, Recorded, seal
from events.types import AnyEvent, Event

__all__ = ["AnyEvent", "Event", "GENESIS_HASH", "Recorded", "seal"]
