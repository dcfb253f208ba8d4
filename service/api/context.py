"""What a route reaches through its request: the runtime, the engine, the read cache,
the read clock."""

from __future__ import annotations

import time
from typing import Any

from projections.state import QueueState
from service.api.read_cache import ReadCache
from service.api.request_id import request_id_of
from service.engine import Engine
from service.runtime import Runtime

__all__ = ["runtime_of", "engine_of", "read_cache_of", "read_now", "request_id_of"]


def runtime_of(connection: Any) -> Runtime:
    return connection.app.state.runtime  # type: ignore[no-any-return]


def engine_of(connection: Any) -> Engine:
    return connection.app.state.runtime.engine  # type: ignore[no-any-return]


def read_cache_of(connection: Any) -> ReadCache:
    return connection.app.state.read_cache  # type: ignore[no-any-return]


def read_now(state: QueueState) -> float:
    """The time reads are answered at: never earlier than the last committed event."""
    return max(time.time(), state.last_at)
