"""The app over HTTP, in process: a real Runtime (SQLite log in tmp_path, the local
executor, an inventory of ``4xA100:40``) behind Litestar's ``AsyncTestClient``.

Configs used by the tests:

- ``sleeper``: one GPU, ``sleep 60`` (a job that keeps running while a test looks at it);
- ``cpu``: no GPU, ``sleep 60``;
- ``pair``: GPUs 0 and 1 (``device_ids``), ``sleep 60``;
- ``costly``: ``estimated_cost = 100`` (over the approval threshold of 50).

With the default ``local_job_max_concurrent = 1`` at most one job runs at a time, so the
first job submitted starts and the others wait. Job processes are killed at teardown.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # api_harness, in any import mode
    sys.path.insert(0, str(HERE))

from api_harness import Api, open_api, write_configs  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    write_configs(path)
    return path


@pytest.fixture
async def api(data_dir: Path) -> AsyncIterator[Api]:
    async with open_api(data_dir) as opened:
        yield opened
