"""How a local job is launched: its environment, a pre-flight check, the wrapper's argv."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from events.types import JobSpec
from service.executors.wrapper import JOB_MARK

__all__ = ["WRAPPER", "job_environment", "launch_problem", "wrapper_argv"]

WRAPPER = Path(__file__).with_name("wrapper.py")


def job_environment(
    base: Mapping[str, str], spec: JobSpec, job_id: str, gpus: tuple[int, ...]
) -> dict[str, str]:
    """The server's environment, then the config's ``env``, then gpuyard's own variables.

    gpuyard's variables come last so a config cannot claim GPUs it was not given. A
    CPU-only job gets ``CUDA_VISIBLE_DEVICES=""``: it sees no GPU.
    """
    env = dict(base)
    env.update(spec.env)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in gpus)
    env[JOB_MARK] = job_id  # every process of the job inherits it (see the wrapper)
    return env


def launch_problem(argv: tuple[str, ...], cwd: str | None, env: Mapping[str, str]) -> str | None:
    """Why this command cannot start (a config error, not worth a retry), or None."""
    if not argv or not argv[0]:
        return "the job has an empty command"
    if cwd is not None and not os.path.isdir(cwd):
        what = "is not a directory" if os.path.exists(cwd) else "does not exist"
        return f"working_dir {cwd!r} {what}"
    program = argv[0]
    if os.sep in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.path.exists(path):
            return f"command not found: {program}"
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return f"command is not executable: {program}"
        return None
    if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        return f"command not found: {program} (not on the job's PATH)"
    return None


def wrapper_argv(run_dir: Path, attempt: int, cwd: str | None, argv: tuple[str, ...],
                 *, report_fd: int | None = None) -> list[str]:
    """The argv that starts the wrapper around ``argv`` (see ``wrapper.py``);
    ``report_fd``: the write end of a pipe the wrapper inherits, to report the job's end."""
    head = [sys.executable, "-I", str(WRAPPER), "--run-dir", str(run_dir),
            "--attempt", str(attempt)]
    if cwd is not None:
        head += ["--cwd", cwd]
    if report_fd is not None:
        head += ["--report-fd", str(report_fd)]
    return [*head, "--", *argv]
