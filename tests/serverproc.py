"""A real ``gpuyard serve`` process for tests: loopback, a free port, its own data dir.

    server = ServerProcess(tmp_path / "data", gpus="4xA100:40").start()
    httpx.get(server.url + "/api/queue/stats")
    server.kill()      # SIGKILL, like a crash
    server.restart()   # same data dir, same port
    server.stop()      # SIGTERM, then SIGKILL if it does not go

Jobs started by the server run detached and outlive it (SPEC section 8); call
:func:`kill_job_processes` (``stop(kill_jobs=True)`` does) so a test leaves none behind.
The server's stderr goes to ``<data_dir>/server.log`` (``.log_tail()`` in failures).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "kill_job_processes", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_SERVE = "from service.cli import main; main()"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def kill_job_processes(data_dir: str | Path) -> int:
    """SIGKILL the process group of every job launched under ``data_dir`` that still runs.

    The wrapper leads its job's process group; its ``launch.json`` names its pid and
    start time, checked so that a recycled pid is never hit. Returns how many it killed.
    """
    killed = 0
    for launch in Path(data_dir, "runs").glob("*/launch.json"):
        try:
            record = json.loads(launch.read_text())
            pid, start = int(record["pid"]), int(record["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(pid) != start:
            continue
        try:
            os.killpg(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    return killed


class ServerProcess:
    """One ``gpuyard serve`` subprocess bound to 127.0.0.1."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        gpus: str | None = "4xA100:40",
        port: int | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.data_dir = Path(data_dir)  # relative: to ``cwd``, as the server sees it
        self.cwd = cwd
        self.gpus = gpus
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = cwd / self.data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-c", _SERVE, "serve", "--host", "127.0.0.1",
                "--port", str(self.port), "--data-dir", str(self.data_dir)]
        if self.gpus is not None:
            argv += ["--gpus", self.gpus]
        return argv

    def start(self) -> ServerProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        (self.cwd / self.data_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("GPUYARD_GPUS", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        self._wait_until_answering()
        return self

    def _wait_until_answering(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                httpx.get(self.url + "/schema/openapi.json", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not answer within {self.startup_timeout}s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash (its jobs live on)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, *, kill_jobs: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``); optionally kill its jobs too."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if kill_jobs:
            kill_job_processes(self.cwd / self.data_dir)

    def restart(self) -> ServerProcess:
        """Stop it if it runs, then start it again on the same port and data dir."""
        self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop(kill_jobs=True)
