"""One server per data directory (README): the lock of ``service.runtime.DataDirLock`` on
real directories. Every holder here is its own open file description, as a second
process's would be, so ``flock`` refuses it in this process too."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest

from service import runtime
from service.runtime import DataDirLock

BUSY = "another gpuyard server is using"


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    with pytest.raises(OSError, match=BUSY):
        DataDirLock(tmp_path)
    first.release()
    first.release()  # a second call does nothing
    DataDirLock(tmp_path).release()


def test_deleting_server_lock_does_not_let_a_second_server_in(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    (tmp_path / "server.lock").unlink()
    with pytest.raises(OSError, match=BUSY):
        DataDirLock(tmp_path)  # the directory itself is held
    first.release()


def test_a_holder_of_server_lock_alone_keeps_others_out(tmp_path: Path) -> None:
    """An older gpuyard locked only ``server.lock``; so does a server on NFS."""
    fd = os.open(tmp_path / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OSError, match=BUSY):
            DataDirLock(tmp_path)
    finally:
        os.close(fd)
    DataDirLock(tmp_path).release()


def test_a_file_system_that_cannot_lock_a_directory_falls_back_to_server_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS emulates flock with write locks, which a directory opened read-only cannot
    take (EBADF): the server still starts, held by ``server.lock``."""
    real_flock = fcntl.flock

    def nfs_flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(runtime.fcntl, "flock", nfs_flock)
    first = DataDirLock(tmp_path)
    with pytest.raises(OSError, match=BUSY):
        DataDirLock(tmp_path)
    first.release()
    DataDirLock(tmp_path).release()


def test_the_lock_is_not_inherited_by_the_jobs_the_server_starts(tmp_path: Path) -> None:
    """A job that outlives the server must not keep the next server out."""
    held = DataDirLock(tmp_path)
    try:
        fds = held._fds  # noqa: SLF001 - the descriptors are the subject here
        assert len(fds) == 2
        assert not any(os.get_inheritable(fd) for fd in fds)
    finally:
        held.release()
