"""The GPU inventory: NVML when it works, else the ``--gpus`` spec, else no GPUs.

The spec (SPEC section 1) is a comma-separated list of groups, each ``COUNT`` or
``COUNTxMODEL:MEMORY_GB``; ``none`` or ``0`` means no GPUs (``serve`` refuses an empty
``--gpus``, a likely mistake, before it gets here). Devices get indices
0..n-1 in the order written. A bare count (``4``) gives devices named ``GPU`` with
``memory_gb`` 0.0 (unknown). Examples: ``none``, ``4``, ``4xA100:40``, ``2xH100:80,2xL4:24``.

NVML is reached through ``pynvml`` (package ``nvidia-ml-py``); when it is missing or fails,
one log line says so and the inventory is empty (backend ``none``).
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from msgspec import Struct

from events.types import GpuDevice

__all__ = ["Inventory", "detect_inventory", "gpu_usage", "parse_gpu_spec"]

log = structlog.get_logger(__name__)

_GROUP = re.compile(  # ASCII digits only: int() would take '٤' for 4
    r"(?P<count>[0-9]+)(?:x(?P<model>[A-Za-z0-9_.\-]+):(?P<memory>[0-9]+(?:\.[0-9]+)?))?")
_SPEC_HELP = "expected none, N, NxMODEL:GB or a comma-separated list such as 2xH100:80,2xL4:24"
_MAX_GPUS = 1024
_MAX_MEMORY_GB = 100_000.0  # a typo, not a GPU (the largest today hold a few hundred)


class Inventory(Struct, frozen=True, kw_only=True):
    """What GPUs this machine has and where that knowledge came from."""

    backend: str  # "nvml", "spec" or "none"
    devices: tuple[GpuDevice, ...] = ()

    @property
    def count(self) -> int:
        return len(self.devices)


def parse_gpu_spec(spec: str) -> tuple[GpuDevice, ...]:
    """Parse a ``--gpus`` spec into devices indexed 0..n-1; ValueError when malformed."""
    text = spec.strip()
    if text.lower() in ("", "none") or re.fullmatch("0+", text):
        return ()  # a bare count of 0 says no GPUs too
    devices: list[GpuDevice] = []
    for raw_group in text.split(","):
        group = raw_group.strip()
        match = _GROUP.fullmatch(group)
        if match is None:
            raise ValueError(f"malformed GPU spec {spec!r}: bad group {group!r}; {_SPEC_HELP}")
        count = int(match["count"])
        if count < 1:
            raise ValueError(f"malformed GPU spec {spec!r}: count must be at least 1 in {group!r}")
        model = match["model"] or "GPU"
        memory_gb = float(match["memory"]) if match["memory"] is not None else 0.0
        if memory_gb > _MAX_MEMORY_GB:
            raise ValueError(f"malformed GPU spec {spec!r}: {match['memory']} GB of memory in "
                             f"{group!r} is more than {_MAX_MEMORY_GB:,.0f} GB")
        if len(devices) + count > _MAX_GPUS:
            raise ValueError(f"malformed GPU spec {spec!r}: more than {_MAX_GPUS} GPUs")
        for _ in range(count):
            devices.append(GpuDevice(index=len(devices), name=model, memory_gb=memory_gb))
    return tuple(devices)


def _nvml() -> Any:
    import pynvml  # imported lazily: a missing library is the fallback path, not a crash

    return pynvml


def _as_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_devices() -> tuple[GpuDevice, ...]:
    nvml = _nvml()
    nvml.nvmlInit()
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    name=_as_text(nvml.nvmlDeviceGetName(handle)),
                    memory_gb=round(memory.total / 1024**3, 1),
                    uuid=_as_text(nvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return tuple(devices)
    finally:
        nvml.nvmlShutdown()


def detect_inventory(spec: str | None) -> Inventory:
    """The inventory: ``spec`` when given (it overrides NVML), else NVML, else no GPUs."""
    if spec is not None:
        return Inventory(backend="spec", devices=parse_gpu_spec(spec))
    try:
        devices = _nvml_devices()
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError, a broken driver: no NVML
        log.warning("nvml_unavailable", error=f"{type(exc).__name__}: {exc}",
                    fallback="no GPUs (use --gpus or GPUYARD_GPUS to declare some)")
        return Inventory(backend="none", devices=())
    return Inventory(backend="nvml", devices=devices)


def _blank_usage(device: GpuDevice) -> dict[str, object]:
    return {
        "index": device.index,
        "name": device.name,
        "uuid": device.uuid,
        "memory_total_gb": device.memory_gb,
        "memory_used_gb": None,
        "utilization_percent": None,
        "memory_utilization_percent": None,
    }


def gpu_usage(inventory: Inventory) -> list[dict[str, object]]:
    """Per-device utilisation and memory in use (NVML); the usage fields are None elsewhere."""
    usage = [_blank_usage(device) for device in inventory.devices]
    if inventory.backend != "nvml" or not usage:
        return usage
    try:
        nvml = _nvml()
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - the status endpoint must answer regardless
        log.warning("nvml_usage_unavailable", error=f"{type(exc).__name__}: {exc}")
        return usage
    try:
        for row, device in zip(usage, inventory.devices):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(device.index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # noqa: BLE001 - one bad device must not hide the rest
                log.warning("nvml_device_query_failed", index=device.index,
                            error=f"{type(exc).__name__}: {exc}")
                continue
            row["memory_used_gb"] = round(memory.used / 1024**3, 2)
            row["utilization_percent"] = float(rates.gpu)
            row["memory_utilization_percent"] = (
                round(100.0 * memory.used / memory.total, 1) if memory.total else None
            )
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - nothing left to release
            log.debug("nvml_shutdown_failed", error=str(exc))
    return usage
