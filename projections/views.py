"""Pure read models over the state: stats, GPU allocation, and a full snapshot.

Time is an argument. Queue order and positions are the scheduler's rule and live in
``service/scheduler.py``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import msgspec

from projections.state import STATUSES, QueueState

__all__ = ["avg_wait_seconds", "mean_run_seconds", "stats", "gpu_allocation", "snapshot"]

DAY = 86400.0


def _since(times: list[float], sums: list[float], since: float) -> tuple[int, float]:
    """How many values were recorded at ``times >= since``, and their total (``sums`` are
    running sums)."""
    start = bisect_left(times, since)
    return len(times) - start, sums[-1] - sums[start]


def avg_wait_seconds(state: QueueState, now: float) -> float | None:
    """Mean of ``started_at - queued_at`` over jobs started in the last 24 h.

    Each dispatch recorded its wait; a re-queued job's earlier starts are taken back, so
    a job counts once, with the start it has now.
    """
    since = now - DAY
    count, total = _since(state.wait_at, state.wait_sums, since)
    taken_back = state.waits_taken_back
    for _, wait in taken_back[bisect_left(taken_back, (since,)):]:
        count -= 1
        total -= wait
    return total / count if count else None


def mean_run_seconds(state: QueueState, now: float) -> float | None:
    """Mean length of the runs that ended in the last 24 h (a retried attempt counts too)."""
    count, total = _since(state.run_end_at, state.run_sums, now - DAY)
    return total / count if count else None


def gpu_allocation(state: QueueState) -> dict[str, Any]:
    """Which GPU each running job holds (SPEC section 7, system status)."""
    devices = [
        {
            "index": d.index,
            "name": d.name,
            "memory_gb": d.memory_gb,
            "allocated": d.index in state.gpu_holder,
            "job_id": state.gpu_holder.get(d.index),
        }
        for d in sorted(state.gpus, key=lambda d: d.index)
    ]
    return {
        "allocated_gpus": sorted(state.gpu_holder),
        "available_gpus": state.free_gpus(),
        "running_local_jobs": state.local_running,
        "devices": devices,
    }


def by_status(state: QueueState) -> dict[str, int]:
    """Jobs per status: ``pending`` and ``running`` always (the seed's example), others when any."""
    counts = state.status_counts
    return {status: n for status in STATUSES
            if (n := counts[status]) or status in ("pending", "running")}


def stats(state: QueueState, now: float) -> dict[str, Any]:
    """``GET /api/queue/stats`` in the seed's shape; counts cover all targets."""
    s = state.settings
    pending_local = state.status_counts["pending"]  # every job is local: no worker exists
    return {
        "queue_depth": state.status_counts["pending"],
        "running": state.running_total,
        "blocked": state.status_counts["blocked"],
        "max_concurrent": s.max_concurrent,
        "user_max_concurrent": s.user_max_concurrent,
        "team_max_concurrent": s.team_max_concurrent,
        "enable_fair_share": s.enable_fair_share,
        "avg_wait_seconds": avg_wait_seconds(state, now),
        "by_status": by_status(state),
        "by_user": {str(user): n for user, n in sorted(state.user_active.items())},
        "local_gpu_max_concurrent": s.local_gpu_max_concurrent,
        "local_job_max_concurrent": s.local_job_max_concurrent,
        "local": {
            "running_jobs": state.local_running,
            "pending_jobs": pending_local,
            "allocated_gpus": sorted(state.gpu_holder),
            "available_gpus": state.free_gpus(),
            "total_gpus": len(state.gpus),
            "max_concurrent_gpus": s.local_gpu_max_concurrent,
            "max_concurrent_jobs": s.local_job_max_concurrent,
        },
    }


def snapshot(state: QueueState) -> dict[str, Any]:
    """Every projection as plain data, in a deterministic order (tests compare these)."""
    index = state.pending
    return {
        "last_seq": state.last_seq,
        "settings": msgspec.to_builtins(state.settings),
        "jobs": {job_id: msgspec.to_builtins(job) for job_id, job in sorted(state.jobs.items())},
        "pending_levels": {
            f"{p}:{'gpu' if gpu else 'cpu'}": [list(key) for key in keys]
            for (p, gpu), keys in sorted(index.levels.items())
        },
        "pending_heads": {
            f"{p}:{'gpu' if gpu else 'cpu'}": [list(key) for key in keys]
            for (p, gpu), keys in sorted(index.heads.items())
        },
        "blocked": list(state.blocked),
        "running": sorted(state.running),
        "user_running": {str(k): v for k, v in sorted(state.user_running.items()) if v},
        "team_running": {k: v for k, v in sorted(state.team_running.items()) if v},
        "local_running": state.local_running,
        "status_counts": dict(state.status_counts),
        "user_active": {str(k): v for k, v in sorted(state.user_active.items())},
        "gpu_backend": state.gpu_backend,
        "gpus": msgspec.to_builtins(state.gpus),
        "gpu_holder": {str(k): v for k, v in sorted(state.gpu_holder.items())},
        "waits": {"count": len(state.wait_at), "sum": round(state.wait_sums[-1], 6)},
        "waits_taken_back": [list(pair) for pair in state.waits_taken_back],
        "runs": {"count": len(state.run_end_at), "sum": round(state.run_sums[-1], 6)},
        "users": {str(k): msgspec.to_builtins(u) for k, u in sorted(state.users.items())},
        "tokens": {k: msgspec.to_builtins(t) for k, t in sorted(state.tokens.items())},
        "idempotency": sorted(f"{user}:{key}={job}" for (user, key), job in
                              state.idempotency.items()),
    }
