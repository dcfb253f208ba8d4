"""``GET /api/audit/export``: every event, filtered, streamed as JSONL or CSV (admin).

The export reads through its own read-only connection to the log (WAL readers never
block the writer) in a worker thread, in chunks, so a large log streams in constant
memory. Each line is ``events.export``'s (``jsonl_line``, ``csv_cells``):
``seq, at, type, actor, correlation_id, causation_id, data, hash``.

Filters: ``after_seq`` (exclusive), ``since``/``until`` (ISO 8601, naive means UTC, or
epoch seconds; inclusive), ``type`` (exact, or a prefix ending in ``.`` such as
``job.``), ``job_id`` (events whose data names the job), ``user_id`` (events whose data
names the user, events the user caused, and every event of the user's jobs).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, get
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
)
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from events.export import FIELDS, csv_cells, jsonl_line
from events.export import parse_time as export_time
from events.log import EventLog, Row
from service.api.auth import CurrentActor
from service.api.context import runtime_of
from service.api.errors import error_responses
from service.commands import InvalidRequest, require_admin

__all__ = ["audit_router", "parse_time", "ExportFilter"]

CHUNK_ROWS = 500
JSONL = "application/x-ndjson"
CSV = "text/csv"  # Litestar adds "; charset=utf-8" to text/* types


def parse_time(name: str, text: str | None) -> float | None:
    """A time filter (:func:`events.export.parse_time`); 422 when it is not one."""
    if text is None or text == "":
        return None
    try:
        return export_time(text)
    except ValueError as exc:
        raise InvalidRequest(f"{name} {exc}, not {text!r}") from None


class ExportFilter:
    """Which rows an export keeps (applied in order of seq)."""

    def __init__(self, *, since: float | None, until: float | None, type_: str | None,
                 job_id: str | None, user_id: int | None, user_jobs: set[str]) -> None:
        self.since = since
        self.until = until
        self.type_ = type_
        self.job_id = job_id
        self.user_id = user_id
        self.user_jobs = user_jobs  # grows as job.submitted events of the user go by
        self.actor_prefix = f"user:{user_id}:" if user_id is not None else None

    def _type_matches(self, type_: str) -> bool:
        wanted = self.type_
        return wanted is None or type_ == wanted or (wanted.endswith(".") and
                                                     type_.startswith(wanted))

    def keep(self, row: Row) -> bool:
        _, at, type_, actor, _, _, data, _ = row
        if self.user_id is not None and type_ == "job.submitted":
            fields = msgspec.json.decode(data)
            if fields.get("user_id") == self.user_id:
                self.user_jobs.add(fields["job_id"])
        if self.since is not None and at < self.since:
            return False
        if self.until is not None and at > self.until:
            return False
        if not self._type_matches(type_):
            return False
        if self.job_id is None and self.user_id is None:
            return True
        fields = msgspec.json.decode(data)
        named = fields.get("job_ids") or ((fields["job_id"],) if "job_id" in fields else ())
        if self.job_id is not None and self.job_id not in named:
            return False
        if self.user_id is not None:
            return (fields.get("user_id") == self.user_id
                    or actor.startswith(self.actor_prefix or "")
                    or any(job_id in self.user_jobs for job_id in named))
        return True


def _csv_rows(rows: list[Row]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(map(csv_cells, rows))
    return out.getvalue().encode("utf-8")


class ExportBroken(RuntimeError):
    """A row could not be exported: the stream must break off, not end as if complete."""


def _export(log: EventLog, after_seq: int, keep: ExportFilter, fmt: str) -> Iterator[bytes]:
    """The export's bytes. A row that cannot be written (a damaged log) ends the stream
    with an error: Litestar reads a ValueError from a sync iterator as its end, so one is
    raised as :class:`ExportBroken`, and the client sees a cut-off body, not a short one."""
    try:
        yield from _export_rows(log, after_seq, keep, fmt)
    except ValueError as exc:
        raise ExportBroken(f"the export stopped at a row it could not write: {exc}") from exc
    finally:
        log.close()


def _export_rows(log: EventLog, after_seq: int, keep: ExportFilter, fmt: str) -> Iterator[bytes]:
    if fmt == "csv":
        yield (",".join(FIELDS) + "\n").encode("ascii")
    chunk: list[Row] = []
    for row in log.rows(after_seq):
        if keep.until is not None and row[1] > keep.until:
            break  # `at` never runs backwards in the log
        if keep.keep(row):
            chunk.append(row)
            if len(chunk) >= CHUNK_ROWS:
                yield _csv_rows(chunk) if fmt == "csv" else b"".join(map(jsonl_line, chunk))
                chunk = []
    if chunk:
        yield _csv_rows(chunk) if fmt == "csv" else b"".join(map(jsonl_line, chunk))


class _ExportOperation(Operation):
    """The export answers JSONL or CSV: both media types belong in the schema."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ok = self.responses.get("200") if self.responses else None
        if isinstance(ok, OpenAPIResponse):
            text = Schema(type=OpenAPIType.STRING)
            ok.content = {JSONL: OpenAPIMediaType(schema=text),
                          "text/csv": OpenAPIMediaType(schema=text)}


@get("/export", sync_to_thread=False, operation_class=_ExportOperation,
     responses=error_responses(401, 403, 422, 503), summary="Export the audit log")
def export(
    request: Request[Any, Any, Any],
    actor: CurrentActor,
    format: FromQuery[Literal["jsonl", "csv"]] = "jsonl",
    since: Annotated[str | None, QueryParameter(max_length=64)] = None,
    until: Annotated[str | None, QueryParameter(max_length=64)] = None,
    after_seq: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
    job_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
    user_id: FromQuery[int | None] = None,
    type: Annotated[str | None, QueryParameter(max_length=64)] = None,
) -> Stream:
    """One line per event, oldest first: ``seq, at, type, actor, correlation_id,
    causation_id, data, hash``. CSV carries ``data`` as a JSON string."""
    require_admin(actor, "exporting the audit log")
    runtime = runtime_of(request)
    user_jobs: set[str] = set()
    if user_id is not None:
        user_jobs = {job.job_id for job in runtime.engine.state.jobs.values()
                     if job.user_id == user_id}
    keep = ExportFilter(since=parse_time("since", since), until=parse_time("until", until),
                        type_=type or None, job_id=job_id or None, user_id=user_id,
                        user_jobs=user_jobs)
    log = runtime.open_log_readonly()
    name = f"gpuyard-audit.{format}"
    return Stream(
        _export(log, after_seq, keep, format),
        media_type=CSV if format == "csv" else JSONL,
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


audit_router = Router(path="/api/audit", route_handlers=[export], tags=["audit"])
