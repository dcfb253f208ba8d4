"""System routes: the machine's status (SPEC section 7, the seed's shape) and job logs.

``GET /api/system/status?include_allocation=true``: load, memory, per-GPU usage (NVML
only), the recorded GPU inventory and, on request, which job holds which GPU.
``GET /api/queue/{job_id}/logs?tail=N``: the job's combined stdout and stderr as text.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import anyio
from litestar import Request, Response, Router, get
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Stream
from msgspec import Struct

from projections import views
from projections.state import QueueState
from service.api.auth import CurrentActor
from service.api.context import runtime_of
from service.api.errors import error_responses
from service.commands import visible_job
from service.executors.run_files import open_output, read_tail
from service.gpus import gpu_usage

__all__ = ["inventory_summary", "memory_percent", "system_router"]

TEXT = "text/plain"  # Litestar adds "; charset=utf-8" to text/* types
CHUNK = 64 * 1024
MAX_TAIL = 10_000_000
MAX_OFFSET = 2**62


class GpuUsage(Struct, kw_only=True):
    index: int
    name: str
    uuid: str | None
    memory_total_gb: float
    memory_used_gb: float | None
    utilization_percent: float | None
    memory_utilization_percent: float | None


class GpuInventorySummary(Struct, kw_only=True):
    backend: str
    count: int
    capabilities: dict[str, Any]


class GpuAllocationDevice(Struct, kw_only=True):
    index: int
    name: str
    memory_gb: float
    allocated: bool
    job_id: str | None


class GpuAllocation(Struct, kw_only=True):
    allocated_gpus: list[int]
    available_gpus: list[int]
    running_local_jobs: int
    devices: list[GpuAllocationDevice]


class SystemStatus(Struct, kw_only=True, omit_defaults=True):
    timestamp: float
    load_avg_5min: float | None
    memory_percent: float | None
    gpus: list[GpuUsage]
    gpu_inventory: GpuInventorySummary
    gpu_allocation: GpuAllocation | None = None


def memory_percent(meminfo: str) -> float | None:
    """Memory in use, in percent, from the text of ``/proc/meminfo``."""
    values: dict[str, int] = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name] = int(fields[0])
    total = values.get("MemTotal")
    available = values.get("MemAvailable")
    if available is None and total is not None:  # kernels before 3.14
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    if not total or available is None:
        return None
    return round(100.0 * (total - available) / total, 1)


def _read_memory_percent() -> float | None:
    try:
        return memory_percent(Path("/proc/meminfo").read_text(encoding="ascii"))
    except OSError:
        return None


def _load_avg_5min() -> float | None:
    try:
        return round(os.getloadavg()[1], 2)
    except OSError:
        return None


def inventory_summary(state: QueueState) -> GpuInventorySummary:
    """The recorded inventory: backend, count, and what it can tell (models, memory)."""
    models = Counter(device.name for device in state.gpus)
    return GpuInventorySummary(
        backend=state.gpu_backend,
        count=len(state.gpus),
        capabilities={
            "usage_metrics": state.gpu_backend == "nvml",
            "models": dict(sorted(models.items())),
            "total_memory_gb": round(sum(device.memory_gb for device in state.gpus), 1),
            "indices": sorted(device.index for device in state.gpus),
        },
    )


@get("/system/status", responses=error_responses(401, 422), summary="Machine status",
     tags=["system"])
async def system_status(
    request: Request[Any, Any, Any], actor: CurrentActor,
    include_allocation: FromQuery[bool] = False,
) -> SystemStatus:
    """Load average, memory in use, per-GPU usage (from NVML; usage fields are null for a
    ``--gpus`` inventory), the recorded GPU inventory and, with ``include_allocation``,
    which job holds each GPU."""
    runtime = runtime_of(request)
    state = runtime.engine.state
    allocation = None
    if include_allocation:
        raw = views.gpu_allocation(state)
        allocation = GpuAllocation(
            allocated_gpus=raw["allocated_gpus"],
            available_gpus=raw["available_gpus"],
            running_local_jobs=raw["running_local_jobs"],
            devices=[GpuAllocationDevice(**device) for device in raw["devices"]],
        )
    inventory = runtime.inventory
    if inventory.backend == "nvml":
        usage = await anyio.to_thread.run_sync(gpu_usage, inventory)  # NVML calls block
    else:
        usage = gpu_usage(inventory)
    return SystemStatus(
        timestamp=time.time(),
        load_avg_5min=_load_avg_5min(),
        memory_percent=_read_memory_percent(),
        gpus=[GpuUsage(**row) for row in usage],  # type: ignore[arg-type]
        gpu_inventory=inventory_summary(state),
        gpu_allocation=allocation,
    )


async def _whole_file(handle: BinaryIO, offset: int) -> AsyncIterator[bytes]:
    async with anyio.wrap_file(handle) as stream:
        if offset:
            # a follower is often at the end already; seeking far past it fails (EINVAL)
            if offset >= os.fstat(handle.fileno()).st_size:
                return
            await stream.seek(offset)
        while chunk := await stream.read(CHUNK):
            yield chunk


# the output is text, whichever of its two answers (whole, or streamed) carries it
_LOG_TEXT = ResponseSpec(data_container=str, media_type=TEXT, generate_examples=False,
                         description="The job's combined stdout and stderr, as text")


@get("/queue/{job_id:str}/logs",
     responses={**error_responses(401, 403, 404, 409, 422), 200: _LOG_TEXT},
     summary="A job's output", tags=["queue"], media_type=TEXT)
async def job_logs(
    request: Request[Any, Any, Any],
    actor: CurrentActor,
    job_id: FromPath[str],
    tail: Annotated[int | None, QueryParameter(ge=1, le=MAX_TAIL,
                                               description="only the last N lines")] = None,
    offset: Annotated[int | None, QueryParameter(
        ge=0, le=MAX_OFFSET, schema_extra={"minimum": 0},  # Litestar drops a 0 bound
        description="skip this many bytes (what a follower has already printed)")] = None,
) -> Response[bytes] | Stream:
    """The job's combined stdout and stderr (every attempt), as text; empty before it runs.
    Your own jobs, or any job for leads and admins."""
    runtime = runtime_of(request)
    visible_job(runtime.engine.state, job_id, actor)
    handle = open_output(runtime.runs_dir, job_id)  # NotTheJobsOutput: 409 (errors.py)
    if handle is None:
        return Response(b"", media_type=TEXT)  # it has not run yet
    if tail is None:
        return Stream(_whole_file(handle, offset or 0), media_type=TEXT)
    with handle:
        content = await anyio.to_thread.run_sync(read_tail, handle, tail)
    return Response(content, media_type=TEXT)


system_router = Router(path="/api", route_handlers=[system_status, job_logs])
