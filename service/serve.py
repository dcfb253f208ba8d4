"""``gpuyard serve``: configure logging, build the runtime and the app, run uvicorn.

A mistake in the arguments (a malformed ``--gpus``, a data directory that cannot be
used, a log that cannot be opened) is one line on stderr and exit status 2, before
anything starts.
"""

from __future__ import annotations

import sys

import structlog

from events.log import LogError
from service.logging import configure_logging

__all__ = ["serve"]


def _refuse(message: str) -> None:
    sys.stderr.write(f"gpuyard: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def serve(host: str, port: int, data_dir: str | None, gpus: str | None) -> None:
    """Run the server until it is stopped (SIGINT/SIGTERM)."""
    import uvicorn

    from service.api import create_app
    from service.runtime import Runtime

    configure_logging()
    if not 0 <= port <= 65535:
        _refuse(f"--port must be 0-65535, not {port}")
    try:
        runtime = Runtime(data_dir, gpus)
    except ValueError as exc:
        _refuse(f"--gpus: {exc}")
        return
    except (LogError, OSError) as exc:
        _refuse(f"cannot use the data directory: {exc}")
        return
    app = create_app(runtime)
    structlog.get_logger("gpuyard.serve").info(
        "server_starting", host=host, port=port, data_dir=str(runtime.data_dir),
        gpus=runtime.inventory.count, gpu_backend=runtime.inventory.backend,
    )
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=15,
            backlog=4096,
        )
    finally:
        runtime.close()
