"""How ``gpuyard replay`` shows its results: rich tables, or JSON with ``--format json``."""

from __future__ import annotations

from typing import Any

import click
import msgspec

from service.cli_tables import (
    console,
    duration,
    key_values,
    print_json,
    stats_pairs,
    table,
    when,
)
from service.replay import CheckReport, Moment, WaitSummary, WhatIfReport, moment_view
from service.scheduler import Explanation
from service.wording import plural

__all__ = ["show_moment", "show_explanation", "show_check", "show_what_if"]


def show_moment(moment: Moment, fmt: str) -> None:
    view = moment_view(moment)
    if fmt == "json":
        print_json(view)
        return
    out = console()
    queue = view["queue"]
    out.print(f"state after seq {moment.seq}, at {when(moment.now)} UTC")
    pending = [dict(row, waited=duration(row["waited_seconds"])) for row in queue["pending"]]
    out.print(table(pending, ["position", "job_id", "user", "team_id", "config_name",
                              "num_processes", "priority", "effective_priority", "queued_at",
                              "waited"],
                    headers=["pos", "job_id", "user", "team", "config", "gpus", "prio",
                             "eff", "queued_at", "waited"],
                    title=f"pending ({len(pending)})"))
    running = [dict(row, running_for=duration(row["running_seconds"]))
               for row in queue["running"]]
    out.print(table(running, ["job_id", "user", "team_id", "config_name", "gpus", "attempt",
                              "started_at", "running_for", "cancel_requested"],
                    headers=["job_id", "user", "team", "config", "gpus", "attempt",
                             "started_at", "running for", "cancelling"],
                    title=f"running ({len(running)})"))
    blocked = queue["blocked"]
    out.print(table(blocked, ["job_id", "user", "team_id", "config_name", "estimated_cost",
                              "submitted_at", "reason"],
                    headers=["job_id", "user", "team", "config", "cost", "submitted_at",
                             "reason"],
                    title=f"blocked ({len(blocked)})"))
    stats = view["stats"]
    out.print(key_values(stats_pairs(stats), title="stats"))
    allocation = view["gpu_allocation"]
    out.print(table(allocation["devices"], ["index", "name", "memory_gb", "allocated", "job_id"],
                    title=f"GPU allocation ({len(allocation['allocated_gpus'])} of "
                          f"{len(allocation['devices'])} allocated)"))


def show_explanation(moment: Moment, explanation: Explanation, fmt: str) -> None:
    if fmt == "json":
        print_json(dict(msgspec.to_builtins(explanation), seq=moment.seq, at=moment.now))
        return
    where = f" at position {explanation.position}" if explanation.position else ""
    click.echo(f"after seq {moment.seq} ({when(moment.now)} UTC): job {explanation.job_id} "
               f"is {explanation.status}{where}")
    for reason in explanation.reasons:
        click.echo(f"  {reason.code}: {reason.detail}")


def _dispatches(items: list[Any]) -> str:
    if not items:
        return "(nothing)"
    return ", ".join(f"{d.job_id}[{','.join(map(str, d.gpus))}]" if d.gpus else d.job_id
                     for d in items)


def show_check(report: CheckReport, fmt: str) -> None:
    if fmt == "json":
        print_json(msgspec.to_builtins(report))
        return
    click.echo(f"checked {plural(report.events, 'event')}: "
               f"{plural(report.passes, 'recorded scheduling pass', 'recorded scheduling passes')} "
               f"({plural(report.dispatches, 'dispatch', 'dispatches')}) and "
               f"{plural(report.commits, 'commit end')}")
    if not report.differences:
        click.echo("no differences: the current scheduler makes every recorded decision")
        return
    rows = [
        {
            "seq": d.seq,
            "at": f"{when(d.at)} UTC",
            "kind": d.kind,
            "recorded": _dispatches(d.recorded),
            "decided": _dispatches(d.decided),
        }
        for d in report.differences
    ]
    console().print(table(rows, ["seq", "at", "kind", "recorded", "decided"],
                          headers=["seq", "at", "kind", "recorded (job[gpus])",
                                   "scheduler now decides"],
                          title=plural(len(rows), "difference")))


def _wait(summary: WaitSummary, key: str) -> str:
    return duration(getattr(summary, key))


def show_what_if(report: WhatIfReport, fmt: str) -> None:
    if fmt == "json":
        print_json(msgspec.to_builtins(report))
        return
    out = console()
    changed = ", ".join(f"{k}={v}" for k, v in report.overrides.items()) or "nothing"
    out.print(f"what if: {changed}")
    rows = [
        {
            "group": row.group,
            "name": row.name,
            "jobs": row.recorded.jobs,
            "rec_mean": _wait(row.recorded, "mean_seconds"),
            "new_mean": _wait(row.what_if, "mean_seconds"),
            "rec_p95": _wait(row.recorded, "p95_seconds"),
            "new_p95": _wait(row.what_if, "p95_seconds"),
            "rec_started": row.recorded.started,
            "new_started": row.what_if.started,
        }
        for row in report.rows
    ]
    out.print(table(rows, ["group", "name", "jobs", "rec_mean", "new_mean", "rec_p95", "new_p95",
                           "rec_started", "new_started"],
                    headers=["", "name", "jobs", "mean wait (recorded)", "mean wait (what-if)",
                             "p95 (recorded)", "p95 (what-if)", "started (rec)",
                             "started (what-if)"],
                    title="waits (first start minus queued_at)"))
    rec, new = report.recorded_utilisation, report.what_if_utilisation

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    out.print(table([
        {"what": "GPU utilisation", "rec": share(rec.utilisation), "new": share(new.utilisation)},
        {"what": "GPU hours", "rec": f"{rec.gpu_hours:.1f}", "new": f"{new.gpu_hours:.1f}"},
        {"what": "span (first submission to last event)", "rec": duration(rec.span_hours * 3600),
         "new": duration(new.span_hours * 3600)},
        {"what": "GPUs", "rec": rec.gpus, "new": new.gpus},
    ], ["what", "rec", "new"], headers=["", "recorded", "what-if"], title="GPUs"))
    if report.refused:
        refused = ", ".join(f"{name} x{count}" for name, count in report.refused.items())
        out.print(f"recorded requests the queue refuses under these settings: {refused}")
