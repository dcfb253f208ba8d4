"""The one snapshot serializer: msgspec Structs (and tuples, sets) as plain JSON.

Every value goes through ``msgspec.to_builtins`` with a deterministic order before syrupy's
JSON extension writes it (dict keys sorted, two-space indent), so a snapshot diffs line
by line and never depends on insertion order.
"""

from __future__ import annotations

from typing import Any

import msgspec
from syrupy.extensions.json import JSONSnapshotExtension


def to_plain(value: Any) -> Any:
    """Structs, tuples, sets and non-string keys as JSON-able builtins, deterministically."""
    return msgspec.to_builtins(value, str_keys=True, order="deterministic")


class StructJSONExtension(JSONSnapshotExtension):
    """syrupy's JSON extension, fed builtins made by :func:`to_plain`."""

    def serialize(self, data: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return super().serialize(to_plain(data), **kwargs)
