"""Shared test setup: the helper modules beside this file, and the one snapshot serializer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helper modules (scenario, snapshot_serializer) work in any
    sys.path.insert(0, str(TESTS))  # import mode, not only pytest's default "prepend"

from snapshot_serializer import StructJSONExtension


@pytest.fixture
def snapshot_json(snapshot):  # type: ignore[no-untyped-def]
    """syrupy's ``snapshot`` through the project's one serializer (Structs as builtins)."""
    return snapshot.use_extension(StructJSONExtension)
