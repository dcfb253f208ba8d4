"""``gpuyard serve``: configure logging, take the port, build the runtime and the app,
run uvicorn.

A mistake in the arguments (a malformed ``--gpus``, a port that is taken, a data
directory that cannot be used, a log that cannot be opened, replayed or written) is one
line on stderr and exit status 2, before anything starts: the port is bound before the
log is replayed, so a server that cannot listen never launches a job, and the start-up's
first write (the GPU inventory) is made before the engine starts.

Stopped by SIGTERM or SIGINT, uvicorn finishes its requests, then re-raises the signal
so that the exit status says how the process ended. The runtime (the log's connection,
which folds SQLite's write-ahead file back into ``events.db``, and the data directory's
lock) is closed before that, in :class:`_Server`.

uvicorn writes a response's status line and headers, then its body, as two socket
writes: two packets, two wake-ups of the client. :class:`CoalescingTransport` holds
the writes made during one turn of the event loop and sends them as one, which on a
small machine is worth about a fifth more requests per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import msgspec
import structlog

from events.log import LogError
from projections.fold import EventDoesNotFit
from service.logging import configure_logging

__all__ = ["serve"]


def _refuse(message: str) -> NoReturn:
    sys.stderr.write(f"gpuyard: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


class CoalescingTransport:
    """A transport whose writes within one event-loop turn go out as one ``write``."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


def _http_protocol() -> Any:
    """uvicorn's httptools protocol over a :class:`CoalescingTransport` (else "auto")."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing: uvicorn's h11 protocol, as it comes
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            wrapped = CoalescingTransport(transport, asyncio.get_running_loop())
            super().connection_made(wrapped)  # type: ignore[arg-type]

    return CoalescingHttpToolsProtocol


def _tune_gc() -> None:
    """Keep the cyclic collector's pauses out of request latency.

    What start-up built (the replayed state, the app, imported modules) lives as long as
    the process: ``gc.freeze`` takes it out of every later collection. Requests allocate
    many short-lived objects; a higher first threshold makes young collections rarer, and
    each one still walks only the young objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (uvicorn listens on it once the app is up)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        _refuse(f"cannot listen on {host}:{port}: {exc}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        _refuse(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def _server_class() -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, with ``on_stop`` run before a stop signal is re-raised."""

        def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
            super().__init__(config)
            self.on_stop = on_stop

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():  # on its way out, it re-raises the signal
                try:
                    yield
                finally:
                    self.on_stop()

    return _Server


def serve(host: str, port: int, data_dir: str | None, gpus: str | None,
          gpus_from: str = "--gpus") -> None:
    """Run the server until it is stopped (SIGINT/SIGTERM); ``gpus_from`` names where
    ``gpus`` came from, for its error."""
    import uvicorn

    from service.api import create_app
    from service.gpus import parse_gpu_spec
    from service.runtime import Runtime

    configure_logging()
    if not 0 <= port <= 65535:
        _refuse(f"--port must be 0-65535, not {port}")
    if gpus is not None:
        # checked on its own: building the runtime replays the log, whose decode errors
        # are ValueErrors too and must not be blamed on --gpus
        try:
            parse_gpu_spec(gpus)
        except ValueError as exc:
            _refuse(f"{gpus_from}: {exc}")
    sock = _listen(host, port)
    try:
        runtime = Runtime(data_dir, gpus)
    except (LogError, OSError) as exc:
        sock.close()
        _refuse(f"cannot use the data directory: {exc}")
    except msgspec.MsgspecError as exc:
        sock.close()
        _refuse(f"cannot replay the event log: an event in it cannot be read ({exc}); "
                "`gpuyard audit verify --db <data-dir>/events.db` names the first bad seq")
    except EventDoesNotFit as exc:
        sock.close()
        _refuse(f"cannot replay the event log: {exc}; `gpuyard audit verify --db "
                "<data-dir>/events.db` names the first altered event (if it finds none, "
                "this is a gpuyard bug)")
    try:
        runtime.record_inventory()
    except LogError as exc:
        runtime.close()
        sock.close()
        _refuse(f"cannot write the event log: {exc}")
    app = create_app(runtime)
    _tune_gc()
    structlog.get_logger("gpuyard.serve").info(
        "server_starting", host=host, port=sock.getsockname()[1],
        data_dir=str(runtime.data_dir), gpus=runtime.inventory.count,
        gpu_backend=runtime.inventory.backend,
    )
    server = None
    try:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=_http_protocol(),
            timeout_graceful_shutdown=15,
            backlog=4096,
            # gpuyard answers its callers directly and reads nothing from the client's
            # address, so the proxy-header rewrite would only cost each request time
            proxy_headers=False,
            server_header=False,
        )
        server = _server_class()(config, on_stop=runtime.close)
        server.run(sockets=[sock])
    finally:
        runtime.close()  # when uvicorn never got as far as serving; closing twice is a no-op
        sock.close()
    if server is None or not server.started:
        raise SystemExit(3)  # the app did not start (uvicorn has logged why), as uvicorn.run
