"""The engine survives its own faults: a failing pass fails one batch, never the writer.

Faults are injected through a subclass of the real Engine on a real SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from events.log import EventLog
from events.types import GpuDevice
from projections.fold import fold
from projections.views import snapshot
from service.commands import LOCAL_ADMIN, SYSTEM, ChangeSettings, ConfigSpec, ObserveInventory, Submit
from service.engine import Engine, EngineUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FaultyPassEngine(Engine):
    """The real engine whose next ``faults`` scheduling passes raise, as a bug would."""

    faults = 0

    def _schedule(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.faults:
            self.faults -= 1
            raise RuntimeError("a bug in the scheduler (injected)")
        return super()._schedule(*args, **kwargs)


def submit(job_id: str, num_processes: int = 1) -> Submit:
    config = ConfigSpec(command=["python", "train.py"], num_processes=num_processes)
    return Submit(job_id=job_id, config_name="train", config=config)


def fold_of(path: Path):  # type: ignore[no-untyped-def]
    log = EventLog(path, readonly=True)
    try:
        return fold(log.read())
    finally:
        log.close()


async def test_a_failing_pass_fails_its_batch_and_the_engine_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    engine = FaultyPassEngine(EventLog(path), tick_seconds=3600)
    async with engine.running():
        devices = tuple(GpuDevice(index=i, name="A100", memory_gb=40.0) for i in range(2))
        await engine.execute(ObserveInventory(backend="fake", devices=devices), SYSTEM)
        await engine.execute(ChangeSettings({"local_job_max_concurrent": 2}), LOCAL_ADMIN)
        before = snapshot(engine.state)

        engine.faults = 1
        with pytest.raises(EngineUnavailable):
            await engine.execute(submit("lost"), LOCAL_ADMIN)
        assert "lost" not in engine.state.jobs
        assert snapshot(engine.state) == before == snapshot(fold_of(path))

        # the writer is still alive: the next command commits and is scheduled
        await engine.execute(submit("next"), LOCAL_ADMIN)
        assert engine.state.jobs["next"].status == "running"
        assert EventLog(path, readonly=True).verify() == engine.state.last_seq
        assert snapshot(fold_of(path)) == snapshot(engine.state)


async def test_a_command_after_shutdown_is_refused_not_lost(tmp_path: Path) -> None:
    engine = Engine(EventLog(tmp_path / "events.db"), tick_seconds=3600)
    async with engine.running():
        await engine.execute(submit("first", num_processes=0), LOCAL_ADMIN)
    await anyio.sleep(0)  # let the write loop close its end
    with pytest.raises(EngineUnavailable):
        await engine.execute(submit("late", num_processes=0), LOCAL_ADMIN)
    assert "late" not in fold_of(tmp_path / "events.db").jobs
