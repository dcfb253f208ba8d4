"""Run the ``gpuyard`` CLI as a real subprocess, the way a person would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gpuyard(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``gpuyard ARGS...`` with this interpreter; GPUYARD_* from the caller's env are dropped."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout, input=input,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed with exactly one line on stderr, no traceback; return it."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuyard: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]
