"""The ``--gpus`` spec of SPEC section 1: valid forms and clear errors for the rest."""

from __future__ import annotations

import pytest

from events.types import GpuDevice
from service.gpus import parse_gpu_spec


def devices(*rows: tuple[str, float]) -> tuple[GpuDevice, ...]:
    return tuple(GpuDevice(index=i, name=name, memory_gb=mem) for i, (name, mem) in enumerate(rows))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ()),
        ("NONE", ()),
        ("", ()),
        ("  none ", ()),
        ("0", ()),
        ("00", ()),
        ("4", devices(*[("GPU", 0.0)] * 4)),
        ("1", devices(("GPU", 0.0))),
        ("4xA100:40", devices(*[("A100", 40.0)] * 4)),
        ("2xH100:80,2xL4:24", devices(("H100", 80.0), ("H100", 80.0), ("L4", 24.0), ("L4", 24.0))),
        ("1xRTX-4090:24, 1xA10G:22.5", devices(("RTX-4090", 24.0), ("A10G", 22.5))),
        ("2,1xT4:16", devices(("GPU", 0.0), ("GPU", 0.0), ("T4", 16.0))),
    ],
)
def test_valid_specs_give_devices_indexed_in_order(spec: str, expected: tuple) -> None:
    assert parse_gpu_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("0xA100:40", "count must be at least 1"),
        ("2,0xT4:16", "count must be at least 1"),
        ("4xA100", "bad group '4xA100'"),
        ("A100:40", "bad group 'A100:40'"),
        ("4xA100:", "bad group '4xA100:'"),
        ("4xA100:forty", "bad group '4xA100:forty'"),
        ("-1", "bad group '-1'"),
        ("2xH100:80,", "bad group ''"),
        ("2xH100:80;2xL4:24", "bad group"),
        ("x", "bad group 'x'"),
        ("4 x A100:40", "bad group"),
        ("2000", "more than 1024 GPUs"),
        ("\u0664", "bad group '\u0664'"),  # an Arabic-Indic 4: digits are ASCII here
        ("2x\u0664:40", "bad group"),
        ("1xA100:\u0664\u0660", "bad group"),
        ("4xA100:999999999999999999999999999999", "is more than 100,000 GB"),
    ],
)
def test_malformed_specs_raise_one_clear_line(spec: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_gpu_spec(spec)
    message = str(caught.value)
    assert says in message
    assert message.startswith(f"malformed GPU spec {spec!r}")
    assert "\n" not in message
