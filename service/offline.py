"""Changes written to a stopped server's log directly: the way back in for an admin.

``gpuyard users add NAME --level admin --data-dir DIR`` creates a user while no server
runs on ``DIR``: for when no admin can sign in any more (the only admin's tokens are
lost, or the first user created was not an admin). It holds the data directory's lock
(so it refuses while a server runs), folds the log, handles the same ``CreateUser``
command the API sends, as the built-in local admin, and appends its events to the hash
chain, once it has verified the chain (it refuses to extend an altered log). It runs no
scheduling pass: the server does that when it starts.
"""

from __future__ import annotations

import time
from pathlib import Path

from events.envelope import seal
from events.log import ChainBroken, EventLog
from projections.fold import fold_batches
from service.commands import LOCAL_ADMIN, CreateUser, handle
from service.ids import new_token, new_token_id, token_hash
from service.runtime import DataDirLock

__all__ = ["OfflineError", "add_user"]


class OfflineError(Exception):
    """The data directory cannot be changed offline (no log there, or a server runs)."""


def add_user(
    data_dir: Path, name: str, level: str, team_id: str | None
) -> tuple[int, str, str]:
    """Create a user in the log of ``data_dir``; return its id, its token's id and the
    token (shown once).

    Raises :class:`OfflineError`, ``events.log.LogError`` or the command's
    ``service.commands.DomainError``; nothing is written then.
    """
    path = data_dir / "events.db"
    if not path.is_file():
        raise OfflineError(f"there is no event log at {path}")
    try:
        lock = DataDirLock(data_dir)
    except OSError as exc:
        raise OfflineError(f"{exc}; stop it first, or create the user over the API") from None
    try:
        log = EventLog(path)
        try:
            try:  # a user appended to an altered log would vouch for it
                log.verify()
            except ChainBroken as exc:
                raise OfflineError(f"{exc}; nothing was added (`gpuyard audit verify` "
                                   "shows the same)") from None
            state = fold_batches(log.batches())
            token = new_token()
            command = CreateUser(name=name, level=level, team_id=team_id,
                                 token_id=new_token_id(), token_hash=token_hash(token))
            now = max(time.time(), state.last_at)
            outcome = handle(command, state, LOCAL_ADMIN, now)
            records, prev = [], log.last_hash
            for seq, event in enumerate(outcome.events, start=state.last_seq + 1):
                record = seal(prev, seq, now, LOCAL_ADMIN.label, None, None, event)
                records.append(record)
                prev = record.hash
            log.append(records)
        finally:
            log.close()
    finally:
        lock.release()
    assert outcome.user_id is not None
    return outcome.user_id, command.token_id, token
