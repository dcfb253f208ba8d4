"""The hash chain of the log a server started from, verified beside the running server.

Start-up replays the log without checking its hashes (a million events fold in seconds;
hashing them would double that). So that an altered log does not go unnoticed until
someone runs ``gpuyard audit verify``, a thread of its own, on a read-only connection,
checks the chain up to the seq start-up replayed and logs the outcome:
``event_log_verified`` (events, seconds), or ``event_log_chain_broken`` at critical
level with the first bad seq. It pauses between blocks of rows, so that the server's
own threads keep the interpreter most of the time, and it stops when the server does.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import structlog

from events.log import ChainBroken, EventLog, LogError, checked_rows

__all__ = ["ChainCheck"]

log = structlog.get_logger("gpuyard.chain_check")

BLOCK = 512  # rows (about 2.5 ms of hashing) between two looks at the stop flag
PAUSE = 0.002  # then the server's threads have the interpreter: a check costs requests
# little (the interpreter would otherwise hand it back only every 5 ms), at about twice
# the time (a million events in some 10 s)


class ChainCheck(threading.Thread):
    """Verify seqs 1..``until_seq`` of the log at ``path`` once; :meth:`stop` ends it early."""

    def __init__(self, path: Path, until_seq: int) -> None:
        super().__init__(name="gpuyard-chain-check", daemon=True)
        self.path = path
        self.until_seq = until_seq
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        started = time.monotonic()
        try:
            event_log = EventLog(self.path, readonly=True)
        except LogError as exc:
            log.error("event_log_not_verified", error=str(exc))
            return
        count = 0
        try:
            for count, _ in enumerate(checked_rows(event_log.rows(0, self.until_seq)), 1):
                if count % BLOCK == 0:
                    if self._stopping.is_set():
                        return
                    time.sleep(PAUSE)
            log.info("event_log_verified", events=count,
                     seconds=round(time.monotonic() - started, 3))
        except ChainBroken as exc:
            log.critical(
                "event_log_chain_broken", seq=exc.seq, why=exc.why,
                detail=f"the event log was altered at seq {exc.seq}: what the queue shows "
                       "may not be what happened; `gpuyard audit verify` names the same seq",
            )
        except LogError as exc:
            log.error("event_log_not_verified", error=str(exc))
        finally:
            event_log.close()
