"""The composition root: one data directory, its log, the engine, configs, GPUs, executor.

``Runtime(data_dir, gpus)`` builds everything without starting anything; ``async with
runtime.running():`` records the GPU inventory as an event (only when it changed),
starts the check of the replayed log's hash chain, the engine's write loop and the
local executor, and stops them in reverse order when the block ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from events.log import EventLog
from service.chain_check import ChainCheck
from service.commands import SYSTEM, ObserveInventory
from service.configs import ConfigStore
from service.engine import Engine

__all__ = ["DataDirLock", "Runtime", "resolve_data_dir"]


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The argument, else ``GPUYARD_DATA_DIR``, else ``~/.gpuyard`` (SPEC section 1), made
    absolute once: jobs run in their own directories and are handed paths inside it."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get("GPUYARD_DATA_DIR")
    if not chosen:
        chosen = Path.home() / ".gpuyard"
    return Path(chosen).expanduser().absolute()


class Runtime:
    """Everything one server process needs, built from a data directory and a GPU spec.

    Raises ``ValueError`` for a malformed GPU spec and ``events.log.LogError`` when the
    log cannot be opened, before anything is started.
    """

    def __init__(self, data_dir: str | Path | None, gpus: str | None) -> None:
        from service.gpus import detect_inventory

        self.inventory = detect_inventory(gpus)
        self.data_dir = resolve_data_dir(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "configs").mkdir(exist_ok=True)
        self.runs_dir.mkdir(exist_ok=True)
        self._lock = DataDirLock(self.data_dir)
        self.log_path = self.data_dir / "events.db"
        try:
            self.event_log = EventLog(self.log_path)
        except BaseException:
            self._lock.release()
            raise
        self.engine = Engine(self.event_log)
        self.configs = ConfigStore(self.data_dir / "configs")
        self._inventory_recorded = False

    @property
    def runs_dir(self) -> Path:
        """Where each job's run files live (``<data-dir>/runs/<job_id>``)."""
        return self.data_dir / "runs"

    def open_log_readonly(self) -> EventLog:
        """A separate read-only connection to the log (exports): never blocks the writer."""
        return EventLog(self.log_path, readonly=True)

    def record_inventory(self) -> None:
        """Record the GPU inventory if it changed (a pass may follow), before anything runs:
        the first write of a start-up, so a log that cannot be written is found here.
        Raises :class:`events.log.LogError`."""
        if not self._inventory_recorded:
            self.engine.execute_now(
                ObserveInventory(
                    backend=self.inventory.backend, devices=tuple(self.inventory.devices)
                ),
                SYSTEM,
            )
            self._inventory_recorded = True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Runtime]:
        """Record the inventory (if :meth:`record_inventory` has not), then start the chain
        check, the engine and the local executor."""
        from service.executors.local import LocalExecutor

        self.record_inventory()
        check = ChainCheck(self.log_path, self.engine.replayed_seq)
        if check.until_seq:  # a new log has nothing to check
            check.start()
        try:
            async with self.engine.running():
                executor = LocalExecutor(self.engine, self.runs_dir)
                async with anyio.create_task_group() as task_group:
                    await task_group.start(executor.run)
                    try:
                        yield self
                    finally:
                        task_group.cancel_scope.cancel()
        finally:
            check.stop()

    def close(self) -> None:
        """Close the log and release the data directory; a second call does nothing."""
        self.event_log.close()  # apsw's close, like release, may be called again
        self._lock.release()  # the next server may use the data directory


class DataDirLock:
    """One server per data directory: two would both append and both launch jobs.

    ``flock`` on ``<data-dir>/server.lock``, and on the directory itself so that deleting
    that file does not let a second server in. NFS emulates ``flock`` with byte-range
    locks that need a file open for writing, which a directory cannot be: there the
    directory's lock is skipped and ``server.lock`` alone holds. The locks go with the
    process, so a server killed with SIGKILL leaves nothing to clean up; the descriptors
    are not inherited, so a job that outlives the server holds nothing.
    """

    # a file system that cannot lock a directory says so with one of these
    _CANNOT_LOCK = frozenset({errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP})

    def __init__(self, data_dir: Path) -> None:
        self._fds: list[int] = []
        try:
            self._hold(data_dir, os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o644))
            directory = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._hold(data_dir, directory)
            except OSError as exc:
                if exc.errno not in self._CANNOT_LOCK:
                    raise
        except BaseException:
            self.release()
            raise

    def _hold(self, data_dir: Path, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise OSError(f"another gpuyard server is using {data_dir}") from None
            raise
        self._fds.append(fd)

    def release(self) -> None:
        """Let the next server in; a second call does nothing."""
        while self._fds:
            os.close(self._fds.pop())

