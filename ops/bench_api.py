"""Benchmark the HTTP API against a real ``gpuyard serve`` on loopback.

    .venv/bin/python ops/bench_api.py                    # the figures in the README
    .venv/bin/python ops/bench_api.py --submits 2000 --seconds 3    # a quick look

1. starts a server (``--gpus 4xA100:40``, a fresh data dir) on a free port;
2. creates ``--users`` users (the first an admin), a token each;
3. **submit_durable**: ``--clients`` concurrent clients (each its own user and keep-alive
   connection) submit jobs; a 201 means the ``job.submitted`` event is fsynced. The first
   ``--httpx-submits`` go through httpx, the rest (up to ``--submits`` in all) through a
   lean asyncio HTTP/1.1 client. Every client opens its keep-alive connection before the
   clock starts (a client that exists before the work arrives); the lean one ahead of
   its first request, httpx with it;
4. with ``--submits`` jobs pending, **get_stats** (``GET /api/queue/stats``) and
   **get_queue_limit_50** (``GET /api/queue?limit=50`` as an admin: the global listing),
   ``--seconds`` each with each client kind.

Two client kinds because on a small machine httpx itself is the bottleneck: it spends
about a millisecond of CPU per request (``client_cpu_us_per_request``), more than the
server does (``server_cpu_us_per_request``, from /proc). The lean client (pre-encoded
requests, ``readuntil``/``readexactly`` on an asyncio stream, uvloop) costs a few tens of
microseconds, so its figures show what the server sustains. The load comes from
``--processes`` worker processes, the clients split among them. One JSON line per
measurement on stdout; the server's log is ``<data-dir>/server.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CONFIG = 'command = ["sleep", "3600"]\nnum_processes = 0\n'


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    (data_dir / "configs").mkdir(parents=True, exist_ok=True)
    (data_dir / "configs" / "bench.toml").write_text(CONFIG)
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen(
        [sys.executable, "-c", "from service.cli import main; main()", "serve",
         "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
         "--gpus", "4xA100:40"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: see {data_dir / 'server.log'}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/schema/openapi.json", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start within 60 s")


def stop_server(process: subprocess.Popen[bytes], data_dir: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    for launch in data_dir.glob("runs/*/launch.json"):  # the one job that ran
        try:
            os.killpg(int(json.loads(launch.read_text())["pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- two kinds of client

Send = Callable[[bytes | None], Awaitable[int]]  # body -> status code


class HttpxConnection:
    """One client: its own httpx.AsyncClient (one keep-alive connection)."""

    def __init__(self, host: str, port: int, method: str, path: str, token: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}", timeout=60,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        self.method = method
        self.path = path

    async def connect(self) -> None:
        pass  # httpx has no way to connect ahead; it does so on the first request

    async def send(self, body: bytes | None) -> int:
        response = await self.client.request(self.method, self.path, content=body)
        return response.status_code

    async def close(self) -> None:
        await self.client.aclose()


class LeanConnection:
    """One client: a keep-alive HTTP/1.1 connection with pre-encoded request heads."""

    def __init__(self, host: str, port: int, method: str, path: str, token: str) -> None:
        self.address = (host, port)
        self.head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {token}\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(*self.address)

    async def send(self, body: bytes | None) -> int:
        assert self.reader is not None and self.writer is not None, "connect() first"
        if body is None:
            self.writer.write(self.head + b"\r\n")
        else:
            self.writer.write(self.head + b"Content-Type: application/json\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError("the lean client expects a Content-Length")
        length = int(lower[at + 15: lower.index(b"\r\n", at)])
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


CLIENTS = {"httpx": HttpxConnection, "lean": LeanConnection}


# ---------------------------------------------------------------- one load process


async def _drive(kind: str, host: str, port: int, method: str, path: str, tokens: list[str],
                 clients: int, count: int | None, seconds: float | None, expect: int,
                 start_at: float, out: list[tuple[float, float]]) -> int:
    """``clients`` connections sending until ``count`` requests or ``seconds`` are done.

    Each client opens its keep-alive connection before ``start_at``, as a client that
    exists before the work arrives has; the clock starts with the first request.
    """
    connections = [CLIENTS[kind](host, port, method, path, tokens[n % len(tokens)])
                   for n in range(clients)]
    await asyncio.gather(*(connection.connect() for connection in connections))
    await asyncio.sleep(max(0.0, start_at - time.time()))  # every process starts together
    remaining = [count or 0]
    deadline = time.monotonic() + (seconds or 0)
    errors = 0

    async def run(connection: HttpxConnection | LeanConnection, n: int) -> None:
        nonlocal errors
        i = 0
        while (remaining[0] > 0) if count is not None else (time.monotonic() < deadline):
            if count is not None:
                remaining[0] -= 1
            body = None
            if method == "POST":
                body = json.dumps({"config_name": "bench", "metadata": {"c": n, "i": i}}).encode()
            started = time.monotonic()  # system-wide: comparable across processes
            status = await connection.send(body)
            out.append((started, time.monotonic() - started))
            errors += status != expect
            i += 1

    try:
        await asyncio.gather(*(run(connection, n) for n, connection in enumerate(connections)))
    finally:
        for connection in connections:
            await connection.close()
    return errors


def _worker(job: dict, start_at: float, results: multiprocessing.Queue) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    timings: list[tuple[float, float]] = []
    cpu = time.process_time()
    errors = asyncio.run(_drive(start_at=start_at, out=timings, **job))
    results.put((timings, errors, time.process_time() - cpu))


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def measure(server: subprocess.Popen[bytes], processes: int, job: dict,
            clients: int, count: int | None) -> dict[str, float]:
    """Run one load across ``processes`` processes; the figures of the whole."""
    results: multiprocessing.Queue = multiprocessing.Queue()
    server_cpu = cpu_seconds(server.pid)
    start_at = time.time() + 1.0  # time enough for every client to connect
    per_clients = split(clients, processes)
    per_counts = split(count, processes) if count is not None else [None] * processes
    workers = [
        multiprocessing.Process(target=_worker, args=(
            {**job, "tokens": job["tokens"][i::processes] or job["tokens"],
             "clients": per_clients[i], "count": per_counts[i]}, start_at, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    timings: list[tuple[float, float]] = []
    errors = 0
    client_cpu = 0.0
    for _ in workers:
        got, failed, cpu = results.get()
        timings += got
        errors += failed
        client_cpu += cpu
    for worker in workers:
        worker.join()
    server_cpu = cpu_seconds(server.pid) - server_cpu
    done = max(1, len(timings))
    # the window in which requests were in flight (client set-up and tear-down left out)
    elapsed = max(start + took for start, took in timings) - min(start for start, _ in timings)
    latencies = [took for _, took in timings]
    return {
        "requests": len(timings),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "per_second": round(len(timings) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "p999_ms": round(percentile(latencies, 0.999) * 1000, 2),
        "max_ms": round(max(latencies, default=0.0) * 1000, 2),
        "server_cpu_us_per_request": round(server_cpu / done * 1e6),
        "client_cpu_us_per_request": round(client_cpu / done * 1e6),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submits", type=int, default=10_000,
                        help="jobs submitted in all (and so pending for the GETs)")
    parser.add_argument("--httpx-submits", type=int, default=2_000,
                        help="how many of them go through httpx")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per GET measurement")
    parser.add_argument("--processes", type=int,
                        default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                        help="load-generating processes (default: a quarter of the CPUs, "
                             "1 to 4; the server is one process and needs a core)")
    parser.add_argument("--data-dir", default=None, help="default: a fresh temporary dir")
    options = parser.parse_args()

    data_dir = Path(options.data_dir or tempfile.mkdtemp(prefix="gpuyard-bench-"))
    host, port = "127.0.0.1", free_port()
    url = f"http://{host}:{port}"
    server = start_server(data_dir, port)
    common = {"host": host, "port": port}
    shape = {"clients": options.clients, "processes": options.processes,
             "cpus": os.cpu_count()}
    try:
        first = httpx.post(url + "/api/users", json={"name": "bench-0", "level": "admin"})
        first.raise_for_status()
        admin = first.json()["token"]
        tokens = [admin]
        for n in range(1, options.users):
            created = httpx.post(url + "/api/users", headers={"Authorization": f"Bearer {admin}"},
                                 json={"name": f"bench-{n}", "level": "researcher"})
            created.raise_for_status()
            tokens.append(created.json()["token"])

        via_httpx = min(options.httpx_submits, options.submits)
        for kind, count in (("httpx", via_httpx), ("lean", options.submits - via_httpx)):
            if count <= 0:
                continue
            job = {**common, "kind": kind, "method": "POST", "path": "/api/queue/submit",
                   "tokens": tokens, "seconds": None, "expect": 201}
            result = measure(server, options.processes, job, options.clients, count)
            print(json.dumps({"bench": "submit_durable", "client": kind, **shape, **result}),
                  flush=True)

        pending = httpx.get(url + "/api/queue/stats",
                            headers={"Authorization": f"Bearer {admin}"}).json()["queue_depth"]
        for name, path in (("get_stats", "/api/queue/stats"),
                           ("get_queue_limit_50", "/api/queue?limit=50")):
            for kind in ("httpx", "lean"):
                job = {**common, "kind": kind, "method": "GET", "path": path,
                       "tokens": [admin], "seconds": options.seconds, "expect": 200}
                result = measure(server, options.processes, job, options.clients, None)
                print(json.dumps({"bench": name, "client": kind, "pending_jobs": pending,
                                  **shape, **result}), flush=True)
    finally:
        stop_server(server, data_dir)


if __name__ == "__main__":
    main()
