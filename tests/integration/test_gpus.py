"""The GPU inventory on this machine: the spec overrides NVML, NVML failing is one log
line and no GPUs, and ``gpuyard serve`` refuses a malformed spec in one stderr line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import structlog

from service.gpus import Inventory, detect_inventory, gpu_usage, parse_gpu_spec


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any failure means no NVML here
        return False
    return True


NVML = _nvml_works()


def test_a_spec_overrides_nvml() -> None:
    inventory = detect_inventory("2xH100:80,2xL4:24")
    assert inventory == Inventory(backend="spec", devices=parse_gpu_spec("2xH100:80,2xL4:24"))
    assert inventory.count == 4
    assert detect_inventory("none") == Inventory(backend="spec", devices=())


@pytest.mark.skipif(NVML, reason="NVML works here: the fallback path cannot be reached")
def test_without_nvml_one_line_says_so_and_there_are_no_gpus() -> None:
    with structlog.testing.capture_logs() as logs:
        inventory = detect_inventory(None)
    assert inventory == Inventory(backend="none", devices=())
    assert [entry["event"] for entry in logs] == ["nvml_unavailable"]
    assert logs[0]["log_level"] == "warning" and logs[0]["error"]


@pytest.mark.skipif(not NVML, reason="needs a machine where NVML works (an NVIDIA driver)")
def test_nvml_inventory_and_usage_on_a_real_gpu() -> None:
    inventory = detect_inventory(None)
    assert inventory.backend == "nvml" and inventory.count >= 1
    assert [d.index for d in inventory.devices] == list(range(inventory.count))
    assert all(d.uuid and d.memory_gb > 0 and d.name for d in inventory.devices)
    usage = gpu_usage(inventory)
    assert [row["index"] for row in usage] == list(range(inventory.count))
    assert all(row["memory_used_gb"] is not None and row["utilization_percent"] is not None
               for row in usage)
    print(inventory, usage)


def test_usage_of_a_declared_inventory_names_devices_without_metrics() -> None:
    usage = gpu_usage(detect_inventory("2xA100:40"))
    assert usage == [
        {"index": i, "name": "A100", "uuid": None, "memory_total_gb": 40.0,
         "memory_used_gb": None, "utilization_percent": None,
         "memory_utilization_percent": None}
        for i in (0, 1)
    ]
    assert gpu_usage(Inventory(backend="none")) == []


def test_serve_refuses_a_malformed_gpuyard_gpus_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``GPUYARD_GPUS`` is checked as ``--gpus`` is (that flag's own case is
    tests/e2e/test_api_server.py::test_a_malformed_gpu_spec_is_one_line_and_exit_2)."""
    argv = [sys.executable, "-c", "from service.cli import main; main()", "serve",
            "--data-dir", str(tmp_path), "--port", "1"]
    env = {**os.environ, "GPUYARD_GPUS": "4xA100"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2  # as for a malformed --gpus
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "malformed GPU spec '4xA100'" in lines[0]
    assert "Traceback" not in done.stderr
