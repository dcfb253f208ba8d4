"""Run the ``gpuyard`` CLI as a real subprocess, the way a person would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# The CLI with every file it writes limited to N bytes: a write past it fails with EFBIG
# (Python ignores SIGXFSZ), as on a full disk. Set in the child itself: a preexec_fn is
# not safe in a process with threads, as pytest's may be.
_FILE_SIZE_LIMITED = (
    "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "runpy.run_module('service.cli', run_name='__main__', alter_sys=True)"
)


def gpuyard(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            input: str | None = None,
            file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``gpuyard ARGS...`` with this interpreter; GPUYARD_* from the caller's env are dropped.
    ``file_size_limit``: no file it writes may grow past that many bytes (a full disk)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    environ.update(env or {})
    head = [sys.executable, "-m", "service.cli"]
    if file_size_limit is not None:
        head = [sys.executable, "-c", _FILE_SIZE_LIMITED, str(file_size_limit)]
    return subprocess.run(
        [*head, *args],
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
