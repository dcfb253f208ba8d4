"""The ``gpuyard`` command line (SPEC section 9).

The commands for jobs, the queue, users and the audit export talk to a server over HTTP
(:mod:`service.client`); ``audit verify``, ``replay`` and ``backup`` work on files and
need no server. Every failure is one line on stderr (``gpuyard: error: ...``) and a
nonzero exit: 1 when something was refused or failed, 2 for a mistake on the command
line. No traceback is shown for a user's error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from service.client import DEFAULT_URL, Client, ClientError, job_segment, segment
from service.wording import plural

__all__ = ["main", "cli"]

STATUSES = ("pending", "queued", "running", "blocked", "completed", "failed", "cancelled",
            "rejected")
# a queue entry's fields (SPEC section 7; the API's QueueEntry, checked by a test): what
# `jobs list -o` may name even when no entry is listed
ENTRY_FIELDS = ("job_id", "user_id", "team_id", "config_name", "priority", "priority_override",
                "effective_priority", "status", "position", "queued_at", "started_at",
                "completed_at", "estimated_cost", "requires_approval", "attempt",
                "max_attempts", "error_message", "metadata", "allocated_gpus", "job_type",
                "num_processes", "exit_code", "worker_id")
DEFAULT_COLUMNS = ("job_id", "status", "user_id", "config_name", "effective_priority",
                   "position", "allocated_gpus", "queued_at", "started_at")
DEFAULT_HEADERS = ("job_id", "status", "user", "config", "prio", "pos", "gpus", "queued_at",
                   "started_at")
FORMAT = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="table for people, json for programs.")


class Failure(click.ClickException):
    """A user's error: shown as one line on stderr, exit status 1."""


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf (JSON has neither)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> NoReturn:
    try:
        sys.stderr.write(f"gpuyard: error: {_one_line(message)}\n")
        sys.stderr.flush()
    finally:
        sys.exit(code)


def main() -> None:
    """Entry point: run the CLI, turning every user error into one stderr line."""
    try:
        result = cli.main(prog_name="gpuyard", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `gpuyard jobs` alone: its help
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(0)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "gpuyard"
        _fail(f"{exc.format_message()} (see `{where} --help`)", 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except ClientError as exc:
        _fail(str(exc), 1)
    except click.exceptions.Abort:
        _fail("aborted", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # the reader went away (`gpuyard ... | head`): not an error worth a word
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:  # a case no check above foresaw: still one line, no traceback
        if os.environ.get("GPUYARD_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (GPUYARD_DEBUG=1 shows the "
              "traceback)", 1)
    sys.exit(result if isinstance(result, int) else 0)


# ---------------------------------------------------------------- the root group


class _Connection:
    """Where the server is and who we are; the client is made on first use."""

    def __init__(self, server: str, token: str | None, timeout: float) -> None:
        self.server = server
        self.token = token or None
        self.timeout = timeout
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.server, self.token, self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="GPUYARD_URL", default=DEFAULT_URL, show_default=True,
              help="The gpuyard server (also GPUYARD_URL).")
@click.option("--token", envvar="GPUYARD_TOKEN", default=None,
              help="Bearer token, once users exist (also GPUYARD_TOKEN).")
@click.option("--timeout", type=Finite(min=0.1, max=86400), default=30.0, show_default=True,
              help="Seconds to wait for the server.")
@click.pass_context
def cli(ctx: click.Context, server: str, token: str | None, timeout: float) -> None:
    """gpuyard: a job queue for GPU training jobs."""
    connection = _Connection(server, token, timeout)
    ctx.obj = connection
    ctx.call_on_close(connection.close)


def _api(ctx: click.Context) -> Client:
    connection = ctx.find_object(_Connection)
    assert connection is not None
    return connection.client()


def _not_empty(instead: str) -> Any:
    """A callback refusing an empty value: a mistake (an unset variable in a script), not
    the default; ``instead`` says what to give."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise click.BadParameter(f"is empty; {instead}")
        return value

    return check


_DIR_NOT_EMPTY = _not_empty("name a directory, or leave the option out for the default")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--data-dir", envvar="GPUYARD_DATA_DIR", default=None, callback=_DIR_NOT_EMPTY,
              help="Data directory (default: GPUYARD_DATA_DIR, else ~/.gpuyard).")
@click.option("--gpus", envvar="GPUYARD_GPUS", default=None,
              callback=_not_empty("give none, 4, 4xA100:40 or 2xH100:80,2xL4:24, or leave "
                                  "the option out to use NVML"),
              help="GPU inventory instead of NVML: none (or 0), 4, 4xA100:40, "
                   "2xH100:80,2xL4:24.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, data_dir: str | None,
          gpus: str | None) -> None:
    """Start the server (the engine, the API and the local executor)."""
    from service.serve import serve as run_server

    from_env = ctx.get_parameter_source("gpus") is click.core.ParameterSource.ENVIRONMENT
    run_server(host=host, port=port, data_dir=data_dir, gpus=gpus,
               gpus_from="GPUYARD_GPUS" if from_env else "--gpus")


# ---------------------------------------------------------------- shared helpers


def _out() -> Any:
    from service.cli_tables import console

    return console()


def _json(value: Any) -> None:
    """Stable, machine-readable JSON on stdout (keys in the server's or the asked order)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _parse_device_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of GPU indices "
                                 "such as 0,1", param_hint="--device-ids") from None
    if not ids or any(index < 0 for index in ids):
        raise click.BadParameter(f"{text!r} must name GPU indices of 0 or more, such as 0,1",
                                 param_hint="--device-ids")
    return ids


def _parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        labels[key.strip()] = value
    return labels


def _on_gpus(value: Any) -> str:
    """Where a job runs: "on GPU 0", "on GPUs 0, 1", "on no GPU" (a CPU-only job)."""
    if not value:
        return "on no GPU (CPU only)"
    return f"on {'GPU' if len(value) == 1 else 'GPUs'} {', '.join(str(index) for index in value)}"


# ---------------------------------------------------------------- jobs


@cli.group()
def jobs() -> None:
    """Submit, list, follow and manage jobs."""


@jobs.command("submit")
@click.argument("config")
@click.option("--no-wait", is_flag=True, help="Start now or not at all: never queue.")
@click.option("--any-gpu", is_flag=True, help="Any free GPUs, not the config's device_ids.")
@click.option("--dry-run", is_flag=True, help="Say whether it would start now; submit nothing.")
@click.option("--target", type=click.Choice(["auto", "local", "worker", "cloud"]),
              default="auto", show_default=True, help="Where the job runs.")
@click.option("--num-processes", type=click.IntRange(min=0), default=None,
              help="GPUs needed (overrides the config; 0 = CPU only).")
@click.option("--device-ids", default=None, help="GPU indices, e.g. 0,1 (overrides the config).")
@click.option("--requires-approval", is_flag=True, help="Hold the job until an admin approves.")
@click.option("--estimated-cost", type=Finite(min=0), default=None,
              help="Estimated cost (drives approval rules).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Metadata for the job (repeatable), e.g. --label run_name=lr-sweep-3.")
@click.option("--max-attempts", type=click.IntRange(min=1, max=100), default=None,
              help="Attempts after infrastructure failures (default 3).")
@click.option("--idempotency-key", default=None, help="Submitting twice with it makes one job.")
@FORMAT
@click.pass_context
def jobs_submit(ctx: click.Context, config: str, no_wait: bool, any_gpu: bool, dry_run: bool,
                target: str, num_processes: int | None, device_ids: str | None,
                requires_approval: bool, estimated_cost: float | None, labels: tuple[str, ...],
                max_attempts: int | None, idempotency_key: str | None, fmt: str) -> int:
    """Submit a job that runs CONFIG (a config name on the server)."""
    body: dict[str, Any] = {"config_name": config, "target": target}
    ids = _parse_device_ids(device_ids)
    for key, value in (("num_processes", num_processes), ("device_ids", ids),
                       ("estimated_cost", estimated_cost), ("max_attempts", max_attempts),
                       ("idempotency_key", idempotency_key)):
        if value is not None:
            body[key] = value
    for key, flag in (("no_wait", no_wait), ("any_gpu", any_gpu), ("dry_run", dry_run),
                      ("requires_approval", requires_approval)):
        if flag:
            body[key] = True
    if labels:
        body["metadata"] = _parse_labels(labels)
    answer = _api(ctx).post("/api/queue/submit", body)
    status = answer.get("status")
    reason = answer.get("reason")
    because = f": {reason}" if reason else ""
    if fmt == "json":
        _json(answer)
        if status == "rejected" and not dry_run:
            raise Failure(f"{config} was not submitted: it cannot start now and --no-wait "
                          f"was given{because}")
        return 0
    if dry_run:
        if status == "running":
            click.echo(f"dry run: {config} would start now "
                       f"{_on_gpus(answer.get('allocated_gpus'))}")
        elif status == "queued":
            where = answer.get("queue_position")
            at = f" at position {where}" if where else ""
            click.echo(f"dry run: {config} would not start now; it would be queued{at}{because}")
        elif status == "blocked":
            click.echo(f"dry run: {config} would wait for an admin's approval{because}")
        else:
            click.echo(f"dry run: {config} would be {status}{because}")
        click.echo("nothing was submitted")
        return 0
    job_id = answer.get("job_id")
    if status == "rejected":
        raise Failure(f"{config} was not submitted: it cannot start now and --no-wait was "
                      f"given{because}")
    if status == "running":
        click.echo(f"job {job_id}: running {_on_gpus(answer.get('allocated_gpus'))}")
    elif status == "queued":
        click.echo(f"job {job_id}: queued at position {answer.get('queue_position')}")
    elif status == "blocked":
        click.echo(f"job {job_id}: blocked until an admin approves it{because}")
    else:
        click.echo(f"job {job_id}: {status}")
    return 0


@jobs.command("list")
@click.option("-o", "--output", "fields", default=None, metavar="FIELDS",
              help="Comma-separated fields; dots reach into nested ones: "
                   "job_id,status,metadata.run_name")
@FORMAT
@click.option("--status", type=click.Choice(STATUSES), default=None,
              help="Only jobs in this status (queued = pending).")
@click.option("-l", "--limit", type=click.IntRange(1, 500), default=50, show_default=True,
              help="At most this many jobs.")
@click.option("--user", "--user-id", "user_id", type=int, default=None,
              help="Only this user's jobs.")
@click.option("--active", is_flag=True, help="Hide finished jobs.")
@click.pass_context
def jobs_list(ctx: click.Context, fields: str | None, fmt: str, status: str | None,
              limit: int, user_id: int | None, active: bool) -> None:
    """List jobs: pending ones in queue order first, then the rest, newest first."""
    from service.cli_tables import pick, table

    if status == "queued":
        status = "pending"
    answer = _api(ctx).get("/api/queue", status=status, limit=limit, user_id=user_id,
                           include_completed="false" if active else "true")
    entries = answer.get("entries", [])
    columns = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    if fields is not None and not columns:
        raise click.BadParameter("give at least one field", param_hint="-o")
    unknown = [c for c in columns or () if c.split(".")[0] not in ENTRY_FIELDS
               and all(c.split(".")[0] not in e for e in entries)]  # a newer server's: kept
    if unknown:  # a typo, not a column of nulls (a missing *nested* key is only missing)
        raise click.BadParameter(f"no queue entry has a field {', '.join(map(repr, unknown))}; "
                                 f"the fields are {', '.join(ENTRY_FIELDS)}", param_hint="-o")
    if fmt == "json":
        if columns is None:
            _json(entries)
        else:
            _json([{column: pick(entry, column) for column in columns} for entry in entries])
        return
    title = (f"{plural(len(entries), 'job')} (pending {answer.get('total_pending', 0)}, running "
             f"{answer.get('total_running', 0)}, blocked {answer.get('total_blocked', 0)})")
    if columns:
        _out().print(table(entries, columns, title=title))
    else:
        _out().print(table(entries, list(DEFAULT_COLUMNS), headers=DEFAULT_HEADERS, title=title))


def _cancel_line(job_id: str, status: str | None) -> str:
    if status == "running":
        return f"job {job_id}: stopping (SIGTERM, then SIGKILL after the grace period)"
    return f"job {job_id}: cancelled"


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_jobs", is_flag=True,
              help="Cancel every unfinished job you may cancel (every job for leads/admins).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before --all on a terminal.")
@click.pass_context
def jobs_cancel(ctx: click.Context, job_ids: tuple[str, ...], all_jobs: bool, yes: bool) -> None:
    """Cancel JOB... (one atomic step), or --all."""
    if all_jobs and job_ids:
        raise click.UsageError("give job ids or --all, not both")
    if not all_jobs and not job_ids:
        raise click.UsageError("give the job ids to cancel, or --all")
    api = _api(ctx)
    if all_jobs:
        if not yes and sys.stdin.isatty() and sys.stdout.isatty():
            click.confirm("cancel every unfinished job you may cancel?", abort=True)
        _echo_cancelled(api.post("/api/queue/cancel", {"all": True}).get("cancelled", []))
        return
    if len(job_ids) == 1:
        answer = api.post(f"/api/queue/{job_segment(job_ids[0])}/cancel")
        click.echo(_cancel_line(job_ids[0], answer.get("status")))
        return
    answer = api.post("/api/queue/cancel", {"job_ids": list(job_ids)})
    _echo_cancelled(answer.get("cancelled", []))


def _echo_cancelled(cancelled: list[str]) -> None:
    """A bulk cancel's answer: running ones among them stop after SIGTERM (or SIGKILL)."""
    click.echo(f"cancelled {plural(len(cancelled), 'job')}" + (f": {', '.join(cancelled)}"
                                                     if cancelled else ""))


@jobs.command("status")
@FORMAT
@click.pass_context
def jobs_status(ctx: click.Context, fmt: str) -> None:
    """Queue statistics: depth, running jobs, limits, waits, local GPUs."""
    from service.cli_tables import key_values, stats_pairs

    answer = _api(ctx).get("/api/queue/stats")
    if fmt == "json":
        _json(answer)
        return
    _out().print(key_values(stats_pairs(answer), title="queue"))


@jobs.command("show")
@click.argument("job_id")
@FORMAT
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, fmt: str) -> None:
    """One job's queue entry."""
    from service.cli_tables import key_values

    answer = _api(ctx).get(f"/api/queue/{job_segment(job_id)}")
    if fmt == "json":
        _json(answer)
        return
    _out().print(key_values(answer.items(), title=f"job {job_id}"))


@jobs.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the job ends.")
@click.option("--tail", type=click.IntRange(min=1), default=None,
              help="Only the last N lines (at the start, with -f).")
@click.option("--interval", type=Finite(min=0.05), default=1.0, show_default=True,
              help="Seconds between polls with -f.")
@click.pass_context
def jobs_logs(ctx: click.Context, job_id: str, follow: bool, tail: int | None,
              interval: float) -> None:
    """A job's combined stdout and stderr."""
    api = _api(ctx)
    path = f"/api/queue/{job_segment(job_id)}/logs"
    out = sys.stdout.buffer
    if not follow:
        with api.stream(path, tail=tail) as chunks:
            for chunk in chunks:
                out.write(chunk)
        out.flush()
        return
    from projections.state import TERMINAL

    output = _Output(api, path)
    started = False  # the first print: the last ``tail`` lines (all, if None)
    lost_at: float | None = None
    while True:
        try:
            if not started:
                output.print_new(tail)  # --tail prints at once, after reading: all or none
                started = True
            # the status first: output written before the job ended is then all in the file
            entry = api.get(f"/api/queue/{job_segment(job_id)}")
            output.print_new()
        except ClientError as exc:
            if not (exc.unreachable or exc.status in (502, 503, 504)):  # 502/504: a proxy's
                raise
            # the server restarts (jobs outlive it): wait for it a while, then give up
            if lost_at is None:
                lost_at = time.monotonic()
                click.echo(f"gpuyard: {exc}; job {job_id} runs on without it, waiting up to "
                           f"{RECONNECT_SECONDS:g}s for the server to come back", err=True)
            elif time.monotonic() - lost_at > RECONNECT_SECONDS:
                raise
            time.sleep(interval)
            continue
        if lost_at is not None:
            click.echo("gpuyard: the server is back; following on", err=True)
            lost_at = None
        if entry.get("status") in TERMINAL:
            detail = entry.get("status")
            if entry.get("exit_code") is not None:
                detail += f", exit code {entry['exit_code']}"
            click.echo(f"gpuyard: job {job_id} ended: {detail}", err=True)
            return
        time.sleep(interval)


RECONNECT_SECONDS = 60.0  # how long `jobs logs -f` waits for a server that went away


class _Output:
    """A job's output as printed so far: each call prints only what came after it.

    The server sends only the bytes after ``offset``: following a long log costs what it
    grows by, not its size, per poll. ``printed`` counts every byte written, also when
    the server goes away mid-answer, so nothing is printed twice when it comes back.
    """

    def __init__(self, api: Client, path: str) -> None:
        self.api = api
        self.path = path
        self.printed = 0

    def print_new(self, tail: int | None = None) -> None:
        """Print the output past what was printed (at the start: its last ``tail`` lines)."""
        out = sys.stdout.buffer
        try:
            if tail is None:
                with self.api.stream(self.path, offset=self.printed or None) as chunks:
                    for chunk in chunks:
                        out.write(chunk)
                        self.printed += len(chunk)
            else:
                self.printed = _print_tail(self.api, self.path, tail)
        finally:
            out.flush()


def _print_tail(api: Client, path: str, tail: int) -> int:
    """Print the last ``tail`` lines of the output; return the output's size."""
    size = 0
    last_lines: deque[bytes] = deque(maxlen=tail)
    partial = b""
    with api.stream(path) as chunks:
        for chunk in chunks:
            *lines, partial = (partial + chunk).split(b"\n")
            last_lines.extend(line + b"\n" for line in lines)
            size += len(chunk)
    if partial:
        last_lines.append(partial)
    sys.stdout.buffer.write(b"".join(last_lines))
    return size


def _print_explanation(answer: dict[str, Any]) -> None:
    job_id, status, position = answer.get("job_id"), answer.get("status"), answer.get("position")
    where = f" at position {position}" if position else ""
    click.echo(f"job {job_id} is {status}{where}")
    for reason in answer.get("reasons", []):
        click.echo(f"  {reason.get('code')}: {reason.get('detail')}")


@jobs.command("explain")
@click.argument("job_id")
@FORMAT
@click.pass_context
def jobs_explain(ctx: click.Context, job_id: str, fmt: str) -> None:
    """Why JOB is not running now."""
    answer = _api(ctx).get(f"/api/queue/{job_segment(job_id)}/explain")
    if fmt == "json":
        _json(answer)
    else:
        _print_explanation(answer)


@jobs.command("approve")
@click.argument("job_id")
@click.pass_context
def jobs_approve(ctx: click.Context, job_id: str) -> None:
    """Approve a blocked job (admin)."""
    answer = _api(ctx).post(f"/api/queue/{job_segment(job_id)}/approve")
    click.echo(f"job {job_id}: approved, now {answer.get('status', 'pending')}")


@jobs.command("reject")
@click.argument("job_id")
@click.option("--reason", default=None, help="Why (stored as the job's error_message).")
@click.pass_context
def jobs_reject(ctx: click.Context, job_id: str, reason: str | None) -> None:
    """Reject a blocked job (admin)."""
    _api(ctx).post(f"/api/queue/{job_segment(job_id)}/reject", reason=reason)
    click.echo(f"job {job_id}: rejected" + (f" ({reason})" if reason else ""))


class _NegativeValues(click.Command):
    """A command whose arguments may be negative numbers (``-5``): they are values for the
    range check to refuse in words, not unknown options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        numbers = [arg for arg in args if arg[:1] == "-" and arg[1:].isdigit()]
        if numbers and "--" not in args:
            args = [arg for arg in args if arg not in numbers] + ["--", *numbers]
        return super().parse_args(ctx, args)


@jobs.command("priority", cls=_NegativeValues)
@click.argument("job_id")
@click.argument("priority")
@click.pass_context
def jobs_priority(ctx: click.Context, job_id: str, priority: str) -> None:
    """Override JOB's priority with PRIORITY (0-100), or `none` to clear it (lead/admin)."""
    value: int | None
    if priority.lower() in ("none", "null", "clear", "reset"):
        value = None
    else:
        if not (priority.removeprefix("-").isdecimal() and 0 <= int(priority) <= 100):
            raise click.BadParameter(f"{priority!r} is not 0-100 or none",
                                     param_hint="PRIORITY")
        value = int(priority)
    answer = _api(ctx).post(f"/api/queue/{job_segment(job_id)}/priority", {"priority": value})
    position = answer.get("position")
    where = f", position {position}" if position else ""
    override = answer.get("priority_override", value)
    click.echo(f"job {job_id}: priority {answer.get('effective_priority')}"
               f" ({'no override' if override is None else f'override {override}'}){where}")


# ---------------------------------------------------------------- queue


@cli.group()
def queue() -> None:
    """Queue limits and maintenance."""


_LIMIT_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("max_concurrent", "--max-concurrent", click.IntRange(min=1), "Jobs running at once."),
    ("user_max_concurrent", "--user-max-concurrent", click.IntRange(min=1), "Per user."),
    ("team_max_concurrent", "--team-max-concurrent", click.IntRange(min=1), "Per team."),
    ("local_job_max_concurrent", "--local-job-max-concurrent", click.IntRange(min=1),
     "Local jobs running at once."),
    ("local_gpu_max_concurrent", "--local-gpu-max-concurrent", str,
     "GPUs local jobs may hold at once, or `none` for unlimited."),
    ("starvation_threshold_minutes", "--starvation-threshold-minutes",
     Finite(min=0, min_open=True), "Minutes of waiting per aging step."),
    ("starvation_boost", "--starvation-boost", click.IntRange(min=0), "Priority per step."),
    ("approval_cost_threshold", "--approval-cost-threshold", Finite(min=0),
     "Jobs costing more wait for approval."),
    ("approval_timeout_hours", "--approval-timeout-hours", Finite(min=0, min_open=True),
     "Blocked jobs older than this are rejected."),
    ("cancel_grace_seconds", "--cancel-grace-seconds", Finite(min=0, max=3600),
     "Seconds between SIGTERM and SIGKILL."),
]


def _limit_options(func: Any) -> Any:
    for name, flag, kind, text in reversed(_LIMIT_OPTIONS):
        func = click.option(flag, name, type=kind, default=None, help=text)(func)
    return click.option("--fair-share/--no-fair-share",
                        "--enable-fair-share/--disable-fair-share", "enable_fair_share",
                        default=None,
                        help="Per-team limits on or off.")(func)


@queue.command("limits")
@_limit_options
@FORMAT
@click.pass_context
def queue_limits(ctx: click.Context, fmt: str, **changes: Any) -> None:
    """Show the queue settings, or change the ones given (admin)."""
    from service.cli_tables import key_values

    body = {name: value for name, value in changes.items() if value is not None}
    gpu_limit = body.get("local_gpu_max_concurrent")
    if gpu_limit is not None:
        if gpu_limit.lower() in ("none", "null", "unlimited"):
            body["local_gpu_max_concurrent"] = None
        else:
            try:
                body["local_gpu_max_concurrent"] = int(gpu_limit)
            except ValueError:
                raise click.BadParameter(f"{gpu_limit!r} is not a whole number or none",
                                         param_hint="--local-gpu-max-concurrent") from None
    api = _api(ctx)
    answer = api.post("/api/queue/concurrency", body) if body else api.get(
        "/api/queue/concurrency")
    if fmt == "json":
        _json(answer)
        return
    title = "queue settings (changed)" if body else "queue settings"
    _out().print(key_values(answer.items(), title=title))


@queue.command("process")
@click.pass_context
def queue_process(ctx: click.Context) -> None:
    """Run one scheduling pass now (admin)."""
    answer = _api(ctx).post("/api/queue/process")
    started = answer.get("job_ids", [])
    click.echo(f"dispatched {plural(answer.get('dispatched', len(started)), 'job')}"
               + (f": {', '.join(started)}" if started else ""))


@queue.command("cleanup")
@click.option("--days", type=click.IntRange(1, 365), default=30, show_default=True,
              help="Remove finished entries older than this.")
@click.pass_context
def queue_cleanup(ctx: click.Context, days: int) -> None:
    """Remove old finished entries from the queue view (the log keeps them; admin)."""
    answer = _api(ctx).post("/api/queue/cleanup", days=days)
    removed = plural(int(answer.get("deleted") or 0), "finished entry", "finished entries")
    click.echo(f"removed {removed} older than {plural(days, 'day')} from the queue view "
               "(the audit log keeps every event)")


# ---------------------------------------------------------------- users


@cli.group()
def users() -> None:
    """Users and their tokens (admin)."""


@users.command("add")
@click.argument("name")
@click.option("--level", type=click.Choice(["admin", "lead", "researcher", "viewer"]),
              required=True, help="What the user may do, and their jobs' base priority.")
@click.option("--team", "--team-id", "team_id", default=None,
              help="Team, for per-team limits.")
@click.option("--data-dir", "data_dir", default=None, callback=_DIR_NOT_EMPTY,
              help="Write to this stopped server's log directly, as the local admin (the "
                   "way back in when no admin can sign in); no server is contacted.")
@FORMAT
@click.pass_context
def users_add(ctx: click.Context, name: str, level: str, team_id: str | None,
              data_dir: str | None, fmt: str) -> None:
    """Create a user; their token is shown this once."""
    if data_dir is not None:
        answer = _add_user_offline(Path(data_dir), name, level, team_id)
    else:
        body: dict[str, Any] = {"name": name, "level": level}
        if team_id:
            body["team_id"] = team_id
        answer = _api(ctx).post("/api/users", body)
    if fmt == "json":
        _json(answer)
        return
    team = f", team {answer.get('team_id')}" if answer.get("team_id") else ""
    click.echo(f"created user {answer.get('user_id')}: {answer.get('name')} "
               f"({answer.get('level')}{team})")
    click.echo(f"token (shown once, keep it): {answer.get('token')}")


def _add_user_offline(data_dir: Path, name: str, level: str,
                      team_id: str | None) -> dict[str, Any]:
    from events.log import LogError
    from service.commands import DomainError
    from service.offline import OfflineError, add_user

    try:
        user_id, token_id, token = add_user(data_dir, name, level, team_id)
    except (OfflineError, LogError, DomainError) as exc:
        raise Failure(str(exc)) from None
    return {"user_id": user_id, "name": name, "level": level, "team_id": team_id,
            "token": token, "token_id": token_id}


@users.command("list")
@FORMAT
@click.pass_context
def users_list(ctx: click.Context, fmt: str) -> None:
    """Every user (tokens are never listed, only their ids)."""
    from service.cli_tables import table

    answer = _api(ctx).get("/api/users")
    if fmt == "json":
        _json(answer)
        return
    rows = [dict(user, tokens=[t.get("token_id") for t in user.get("tokens", [])])
            for user in answer.get("users", [])]
    title = "users" + (" (single-user mode: no users yet)" if answer.get("single_user_mode")
                       else "")
    _out().print(table(rows, ["user_id", "name", "level", "team_id", "tokens"], title=title))


@users.command("token")
@click.argument("user_id", type=int)
@click.option("--revoke", "token_id", default=None, metavar="TOKEN_ID",
              help="Revoke this token instead of issuing a new one.")
@click.pass_context
def users_token(ctx: click.Context, user_id: int, token_id: str | None) -> None:
    """Issue a new token for USER_ID (shown once), or --revoke one."""
    api = _api(ctx)
    if token_id is not None:
        api.delete(f"/api/users/{segment(user_id)}/tokens/{segment(token_id)}")
        click.echo(f"revoked token {token_id} of user {user_id}")
        return
    answer = api.post(f"/api/users/{segment(user_id)}/tokens")
    click.echo(f"token {answer.get('token_id')} for user {user_id} (shown once, keep it):")
    click.echo(str(answer.get("token")))


# ---------------------------------------------------------------- audit


@cli.group()
def audit() -> None:
    """The audit trail: export it, prove it."""


def _timestamp(text: str | None, option: str) -> float | None:
    """ISO 8601 (``2026-01-31``, ``2026-01-31T12:00:00Z``) or epoch seconds."""
    if text is None:
        return None
    from events.export import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} {exc}", param_hint=option) from None


@contextmanager
def _output_file(path: str | None) -> Iterator[Any]:
    """stdout, or a file that appears only once it is whole (a temp file, renamed).

    A write that fails (a full disk) is one error line naming ``path``, and leaves no
    partial file.
    """
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise Failure(f"cannot write {path}: it is a directory")
    try:
        if target.exists() and not target.is_file():  # a device or a pipe: write into it
            with open(target, "wb") as stream:
                yield _Writes(stream, path)
            return
        target = target.resolve()  # a symlink: replace the file it names, keep the link
        if not target.parent.is_dir():
            raise Failure(f"cannot write {path}: no such directory {target.parent}")
        handle = tempfile.NamedTemporaryFile("wb", dir=target.parent,
                                             prefix=f".{target.name}.", delete=False)
        try:
            with handle:
                yield _Writes(handle, path)
            os.replace(handle.name, target)
        except BaseException:
            os.unlink(handle.name)
            raise
    except OSError as exc:  # opening, or the last write as the file closed
        raise Failure(f"cannot write {path}: {exc.strerror or exc}") from None


class _Writes:
    """A binary stream whose failed writes are one error line naming the file."""

    def __init__(self, stream: Any, path: str) -> None:
        self._stream = stream
        self._path = path

    def write(self, data: bytes) -> int:
        try:
            return int(self._stream.write(data))
        except OSError as exc:
            raise Failure(f"cannot write {self._path}: {exc.strerror or exc}") from None

    def __getattr__(self, name: str) -> Any:  # flush, writable, closed...: the stream's
        return getattr(self._stream, name)


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--since", default=None, help="Events at or after this time (ISO 8601 or epoch).")
@click.option("--until", default=None, help="Events at or before this time.")
@click.option("--after-seq", type=click.IntRange(min=0), default=None,
              help="Events after this seq (to continue an earlier export).")
@click.option("--job", "--job-id", "job_id", default=None, help="Only this job's events.")
@click.option("--user", "--user-id", "user_id", type=int, default=None,
              help="Only this user's events.")
@click.option("--type", "event_type", default=None, help="Only events of this type, e.g. "
              "job.dispatched.")
@click.option("-o", "--output", default=None, help="Write to this file (default stdout).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Export a local events.db instead of asking the server (whole log only).")
@click.pass_context
def audit_export(ctx: click.Context, fmt: str, since: str | None, until: str | None,
                 after_seq: int | None, job_id: str | None, user_id: int | None,
                 event_type: str | None, output: str | None, db_path: str | None) -> None:
    """Stream the audit log (every event, filtered) as JSONL or CSV."""
    if db_path is not None:
        from service.audit import source_rows, write_export

        if any(v is not None for v in (since, until, after_seq, job_id, user_id, event_type)):
            raise click.UsageError("--db exports the whole log; filters need the server")
        with _output_file(output) as out:
            count = _guard_files(lambda: write_export(source_rows(db_path), out, fmt))
        if output not in (None, "-"):
            click.echo(f"exported {plural(count, 'event')} to {output}", err=True)
        return
    _timestamp(since, "--since")  # a bad time is refused here, before any request
    _timestamp(until, "--until")
    params = {
        "format": fmt,
        "since": since,
        "until": until,
        "after_seq": after_seq,
        "job_id": job_id,
        "user_id": user_id,
        "type": event_type,
    }
    lines = 0
    with _api(ctx).stream("/api/audit/export", **params) as chunks, _output_file(output) as out:
        for chunk in chunks:
            out.write(chunk)
            lines += chunk.count(b"\n")
    if output not in (None, "-"):
        events = lines - 1 if fmt == "csv" and lines else lines
        click.echo(f"exported {plural(events, 'event')} to {output}", err=True)


def _guard_files(action: Any) -> Any:
    """Run ``action``, turning a log or export that cannot be read into one error line."""
    from service.audit import AuditError, ChainBroken, LogError

    try:
        return action()
    except ChainBroken:
        raise
    except (AuditError, LogError) as exc:
        raise Failure(str(exc)) from None
    except OSError as exc:
        raise Failure(f"{exc.filename or 'file'}: {exc.strerror or exc}") from None


@audit.command("verify")
@click.argument("export", required=False, type=click.Path(dir_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="An events.db file (a copy or a backup) instead of an export.")
@click.option("--partial", is_flag=True,
              help="A filtered export: check every link it holds, trust the lines whose "
                   "predecessor it lacks.")
def audit_verify(export: str | None, db_path: str | None, partial: bool) -> None:
    """Check the hash chain of an export (JSONL or CSV) or of a database file."""
    from service.audit import ChainBroken, is_sqlite, verify_file, verify_partial

    if (export is None) == (db_path is None):
        raise click.UsageError("give an EXPORT file or --db FILE (one of them)")
    path = db_path or export
    assert path is not None
    try:
        result = _guard_files(lambda: (verify_partial if partial else verify_file)(path))
    except ChainBroken as exc:
        hint = ""
        if export is not None and not partial and exc.seq == 1 and exc.missing \
                and not is_sqlite(export):  # a database is never a filtered export
            hint = "; an export filtered by --since, --job ... is checked with --partial"
        raise Failure(f"{path}: {exc} (the first bad event is seq {exc.seq}){hint}") from None
    if result.count == 0:
        click.echo(f"ok: {path} holds no events")
        return
    trusted = f", {result.trusted} taken on trust" if partial and result.trusted else ""
    click.echo(f"ok: {plural(result.count, 'event')}, seq {result.first_seq}.."
               f"{result.last_seq}, hash chain intact{trusted}; head hash {result.head_hash}")


# ---------------------------------------------------------------- backup


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="The log to copy (default: events.db in the data directory).")
@click.option("--data-dir", envvar="GPUYARD_DATA_DIR", default=None, callback=_DIR_NOT_EMPTY,
              help="Data directory (default: GPUYARD_DATA_DIR, else ~/.gpuyard).")
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def backup(dest: str, db_path: str | None, data_dir: str | None, force: bool) -> None:
    """A consistent copy of the log while the server runs, verified after copying."""
    from service.audit import ChainBroken, backup_log
    from service.runtime import resolve_data_dir

    source = Path(db_path) if db_path else resolve_data_dir(data_dir) / "events.db"
    if not source.is_file():
        raise Failure(f"no event log at {source}")
    target = Path(dest)
    if target.exists() and not force:
        raise Failure(f"{dest} exists; give --force to replace it")
    try:
        result = _guard_files(lambda: backup_log(source, target))
    except ChainBroken as exc:
        raise Failure(f"the copy of {source} does not verify: {exc}; {dest} was left as it "
                      "was") from None
    click.echo(f"backed up {plural(result.count, 'event')} (seq 1..{result.last_seq}) from "
               f"{source} to {dest}; hash chain verified, head hash {result.head_hash}")


# ---------------------------------------------------------------- replay


class _Bar:
    """The replay's progress as a rich bar on stderr (only on a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                                 console=_stderr_console())
        self.task: Any = None
        self.pending = 0

    def phase(self, name: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=self.pending, visible=False)
        self.pending = 0
        self.task = self.progress.add_task(name, total=total)

    def advance(self, count: int = 1) -> None:
        self.pending += count
        if self.pending >= 500:
            self.progress.update(self.task, advance=self.pending)
            self.pending = 0


def _stderr_console() -> Any:
    from service.cli_tables import console

    return console(stderr=True)


@contextmanager
def _progress(total: int | None, name: str) -> Iterator[Any]:
    if not sys.stderr.isatty():
        yield None
        return
    bar = _Bar()
    with bar.progress:
        bar.phase(name, total)
        yield bar


def _log_size(path: str) -> int | None:
    from events.log import EventLog
    from service.audit import is_sqlite

    if not is_sqlite(path):
        return None
    log = EventLog(path, readonly=True)
    try:
        return log.last_seq
    finally:
        log.close()


@cli.command()
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
              help="An events.db (opened read-only; use a copy of production) or an export.")
@click.option("--until-seq", type=click.IntRange(min=0), default=None,
              help="Replay up to and including this seq.")
@click.option("--until", "until", default=None,
              help="Replay up to this time (ISO 8601 or epoch seconds).")
@click.option("--explain", "explain_job", default=None, metavar="JOB",
              help="Why JOB was not running at that point.")
@click.option("--check", is_flag=True,
              help="Re-run the scheduler at every recorded dispatch; report differences.")
@click.option("--what-if", "what_if", multiple=True, metavar="KEY=VALUE",
              help="Replay the recorded inputs under other settings, e.g. "
                   "--what-if max_concurrent=10 user_max_concurrent=3.")
@click.argument("more_settings", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--no-verify", is_flag=True, help="Skip checking the hash chain while reading.")
@FORMAT
def replay(db_path: str, until_seq: int | None, until: str | None, explain_job: str | None,
           check: bool, what_if: tuple[str, ...], more_settings: tuple[str, ...],
           no_verify: bool, fmt: str) -> int:
    """The replay debugger: the queue as it was, and what the scheduler would do."""
    from projections.fold import EventDoesNotFit
    from service import replay as debugger
    from service.audit import ChainBroken, read_records, source_rows

    if more_settings and not what_if:
        raise click.UsageError(f"unexpected {more_settings[0]!r}: settings go with --what-if")
    modes = [name for name, on in (("--check", check), ("--what-if", bool(what_if)),
                                   ("--explain", explain_job is not None)) if on]
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} cannot be combined; pick one")
    if until_seq is not None and until is not None:  # two moments: name one
        raise click.UsageError("--until-seq and --until cannot be combined; pick one")
    until_at = _timestamp(until, "--until")
    overrides: dict[str, Any] = {}
    if what_if:
        try:
            overrides = debugger.parse_overrides([*what_if, *more_settings])
        except debugger.ReplayError as exc:
            raise click.BadParameter(str(exc), param_hint="--what-if") from None

    def records() -> Iterator[Any]:
        stream = read_records(source_rows(db_path), verify=not no_verify)
        return debugger.prefix(stream, until_seq, until_at)

    def run() -> Any:
        total = _log_size(db_path)
        if until_seq is not None and total is not None:
            total = min(total, until_seq)
        if check:
            with _progress(total, "checking") as bar:
                return debugger.check(records(), bar)
        if what_if:
            with _progress(total, "reading") as bar:
                return debugger.what_if(records(), overrides, bar)
        with _progress(total, "replaying") as bar:
            return debugger.replay_until(records(), progress=bar, until_at=until_at)

    try:
        result = _guard_files(run)
    except ChainBroken as exc:
        raise Failure(f"{db_path}: {exc}; replay stops here (verify with `gpuyard audit "
                      "verify`, or give --no-verify to replay it anyway)") from None
    except EventDoesNotFit as exc:
        if not no_verify:
            raise  # a verified log that does not fold: our bug (main names it; GPUYARD_DEBUG)
        # only an altered log read with --no-verify holds one: say where, not a KeyError
        raise Failure(f"{db_path}: {exc}, so the log was altered; replay stops here "
                      "(`gpuyard audit verify` names the first bad event)") from None

    from service import replay_output

    if check:
        replay_output.show_check(result, fmt)
        if result.differences:
            differ = "differs" if len(result.differences) == 1 else "differ"
            click.echo(f"gpuyard: {plural(len(result.differences), 'scheduling decision')} "
                       f"{differ} from what was recorded", err=True)
            return 1
        return 0
    if what_if:
        replay_output.show_what_if(result, fmt)
        return 0
    if explain_job is not None:
        try:
            explanation = debugger.explain_at(result, explain_job)
        except debugger.ReplayError as exc:
            raise Failure(str(exc)) from None
        replay_output.show_explanation(result, explanation, fmt)
        return 0
    if until_seq is not None and result.seq < until_seq:
        click.echo(f"gpuyard: the log ends at seq {result.seq}", err=True)
    replay_output.show_moment(result, fmt)
    return 0


if __name__ == "__main__":
    main()
