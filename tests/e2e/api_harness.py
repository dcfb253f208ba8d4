"""Helpers for the e2e tests: the app in process over a real Runtime (see conftest)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from litestar.testing import AsyncTestClient

from serverproc import kill_job_processes
from service.api import create_app
from service.runtime import Runtime

GPUS = "4xA100:40"

CONFIGS = {
    "sleeper": 'command = ["sleep", "60"]\nnum_processes = 1\n',
    "cpu": 'command = ["sleep", "60"]\nnum_processes = 0\n',
    "pair": 'command = ["sleep", "60"]\nnum_processes = 2\ndevice_ids = [0, 1]\n',
    "costly": 'command = ["sleep", "60"]\nestimated_cost = 100.0\n',
    # ignores SIGTERM (an ignored signal stays ignored across exec): only SIGKILL stops it;
    # it writes `ready` in its run directory once it does
    "stubborn": ('command = ["sh", "-c", "trap \'\' TERM; touch ready; sleep 60"]\n'
                 'num_processes = 0\n'),
}


def write_configs(data_dir: Path) -> None:
    configs = data_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for name, text in CONFIGS.items():
        (configs / f"{name}.toml").write_text(text)


class Api:
    """The client, the runtime behind it, and shortcuts the tests share."""

    def __init__(self, client: AsyncTestClient[Any], runtime: Runtime) -> None:
        self.client = client
        self.runtime = runtime
        self.tokens: dict[str, str] = {}  # level -> token, after make_users()
        self.user_ids: dict[str, int] = {}

    @property
    def state(self) -> Any:
        return self.runtime.engine.state

    def auth(self, who: str | None) -> dict[str, str]:
        """Headers acting as ``who`` (a level made by :meth:`make_users`, or a token)."""
        if who is None:
            return {}
        token = self.tokens.get(who, who)
        return {"Authorization": f"Bearer {token}"}

    async def get(self, path: str, who: str | None = None, **params: Any) -> httpx.Response:
        return await self.client.get(path, headers=self.auth(who), params=params)

    async def post(self, path: str, body: Any = None, who: str | None = None,
                   **params: Any) -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.auth(who), params=params)

    async def submit(self, config: str = "sleeper", who: str | None = None,
                     **fields: Any) -> httpx.Response:
        return await self.post("/api/queue/submit", {"config_name": config, **fields}, who)

    async def submit_ok(self, config: str = "sleeper", who: str | None = None,
                        **fields: Any) -> dict[str, Any]:
        response = await self.submit(config, who, **fields)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    async def wait_started(self, *job_ids: str) -> None:
        """Until each job's process has reported in (its ``job.started`` is in the log).

        The executor records that event on its own time; a test that compares two reads
        of the log waits for it first, so that nothing lands between the reads.
        """
        deadline = time.monotonic() + 30.0
        while any(self.state.jobs[job_id].pid is None for job_id in job_ids):
            assert time.monotonic() < deadline, f"{job_ids} never reported started"
            await anyio.sleep(0.01)

    async def make_users(self, *levels: str) -> None:
        """An admin first (it ends single-user mode), then one user per other level."""
        wanted = levels or ("admin", "lead", "researcher", "viewer")
        order = ["admin"] + [level for level in wanted if level != "admin"]
        for level in order:
            who = "admin" if "admin" in self.tokens else None
            response = await self.post("/api/users", {"name": level, "level": level}, who,)
            assert response.status_code == 201, response.text
            self.tokens[level] = response.json()["token"]
            self.user_ids[level] = response.json()["user_id"]


@asynccontextmanager
async def open_api(data_dir: Path, gpus: str = GPUS,
                   tick_seconds: float | None = None) -> AsyncIterator[Api]:
    """The app over ``data_dir`` (whatever its log already holds), stopped at the end.

    ``tick_seconds`` sets the interval of the periodic pass (5 s otherwise): a test that
    needs the queue left as the last change left it, pass-free, sets it far out.
    """
    runtime = Runtime(data_dir, gpus)
    if tick_seconds is not None:
        runtime.engine.tick_seconds = tick_seconds
    try:
        async with AsyncTestClient(app=create_app(runtime)) as client:
            yield Api(client, runtime)
    finally:
        kill_job_processes(data_dir)
        runtime.close()
