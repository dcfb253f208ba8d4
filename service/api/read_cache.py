"""Encoded answers of the hottest reads, reused while nothing has changed.

A queue listing or the stats depend on the committed state and, through aging (and the
24-hour window of ``avg_wait_seconds``), on the clock. An answer is kept for the
committed ``last_seq`` it was computed from, so any commit makes every kept answer
stale at once; and for at most ``min(1 s, starvation_threshold / 60)``, so aging shows
up no later than that. Polling clients (the panel, ``watch gpuyard jobs list``) then
cost the server an encode-free lookup, not a walk of the queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from projections.state import QueueState

__all__ = ["ReadCache", "MAX_AGE_SECONDS"]

MAX_AGE_SECONDS = 1.0
MAX_ENTRIES = 512


class ReadCache:
    """Answers by key, for one committed state at a time."""

    __slots__ = ("_seq", "_answers")

    def __init__(self) -> None:
        self._seq = -1
        self._answers: dict[Hashable, tuple[float, bytes]] = {}

    def answer(self, state: QueueState, key: Hashable, compute: Callable[[], bytes]) -> bytes:
        """The kept answer for ``key``, or ``compute()``'s, kept for next time."""
        now = time.monotonic()
        if state.last_seq != self._seq:
            self._answers.clear()
            self._seq = state.last_seq
        kept = self._answers.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        body = compute()
        if len(self._answers) >= MAX_ENTRIES:
            self._answers.clear()
        max_age = min(MAX_AGE_SECONDS, state.settings.starvation_threshold_minutes)
        self._answers[key] = (now + max_age, body)
        return body
