"""Logging, configured once: JSON lines when not on a terminal, console when on one."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


class _DroppingPrintLogger(structlog.PrintLogger):
    """Prints as structlog's does; a line that cannot be written is dropped.

    The server logs from the engine and the executor: a closed stderr (the reader of a
    pipe went away, a full disk under a redirect) must cost the log lines, not stop the
    queue (the error would fail the request, or the report, that logged).
    """

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):  # ValueError: the file was closed
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Set up structlog (and the stdlib root logger) for the whole process."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _DroppingPrintLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
