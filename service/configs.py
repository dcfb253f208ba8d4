"""Job configs: TOML files ``<data-dir>/configs/<name>.toml`` (SPEC section 2).

A config is read with :mod:`tomllib` into :class:`service.commands.ConfigSpec`; a file is
parsed again only when its ``stat`` changes (size, modification or change time, inode,
device: ``chmod`` changes only the change time), and looked at at most once per
``recheck_seconds`` (1 s): a system call costs tens of microseconds on a small VM and
every submission resolves a config. An edit made to a file directly is therefore seen
within a second; a ``put`` is seen at once. A file that could not be read is read again
at the next look whatever its ``stat`` says. ``put`` writes TOML atomically (temporary
file, fsync, rename) after checking that it reads back to the same config.

An unknown name is :class:`UnknownConfig` (404); a missing directory holds no configs
and a ``put`` creates it again. A ``<name>.toml`` that does not parse, holds wrong
fields, cannot be read, is a directory or a symbolic link to nothing is
:class:`InvalidRequest` (422) whose detail names the file; the listing shows it under
``invalid`` with the same reason. A configs directory the server cannot use (not a
directory, no permission, a failed write) is :class:`ConfigsUnavailable` (503), whose
detail names the directory and the operating system's error.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat as stat_mode
import tempfile
import time
import tomllib
from pathlib import Path

import msgspec
import structlog

from service.commands import ConfigSpec, Conflict, DomainError, InvalidRequest, UnknownConfig

__all__ = [
    "NAME_RULE",
    "ConfigStore",
    "ConfigsUnavailable",
    "check_config",
    "check_name",
    "config_to_toml",
]

log = structlog.get_logger("gpuyard.configs")


class ConfigsUnavailable(DomainError):
    """The server cannot use its configs directory (503): a problem of its environment,
    not of the request; ``detail`` names the directory and the operating system's error."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # fullmatch: no trailing newline
NAME_RULE = ("1-100 characters: letters, digits, '.', '_' or '-', starting with a letter or "
             "digit, and not ending in '.toml'")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _is_name(name: str) -> bool:
    """The one rule for config names (a file ``<name>.toml`` in the configs directory)."""
    return bool(_NAME.fullmatch(name)) and not name.endswith(".toml")


def check_name(name: str) -> str:
    if not _is_name(name):
        raise InvalidRequest(f"config name {name!r} is not valid: {NAME_RULE}")
    return name


def check_config(name: str, spec: ConfigSpec) -> ConfigSpec:
    """The rules every config must meet, whether read from disk or sent over HTTP."""
    where = f"config {name!r}"
    if not spec.command:
        raise InvalidRequest(f"{where}: command must be a non-empty list of strings (argv)")
    for arg in spec.command:
        if not arg or "\x00" in arg:
            raise InvalidRequest(f"{where}: command arguments must be non-empty strings "
                                 "without NUL characters")
    if spec.num_processes is not None and spec.num_processes < 0:
        raise InvalidRequest(f"{where}: num_processes must be 0 or more")
    if spec.device_ids is not None:
        if any(index < 0 for index in spec.device_ids):
            raise InvalidRequest(f"{where}: device_ids must be GPU indices (0 or more)")
        if len(set(spec.device_ids)) != len(spec.device_ids):
            raise InvalidRequest(f"{where}: device_ids lists a GPU twice")
    for key, value in spec.env.items():
        if not _ENV_KEY.match(key):
            raise InvalidRequest(f"{where}: env name {key!r} is not a valid variable name")
        if "\x00" in value:
            raise InvalidRequest(f"{where}: env value of {key} contains a NUL character")
    if spec.working_dir is not None and (not spec.working_dir.startswith("/")
                                         or "\x00" in spec.working_dir):
        # relative to what? the job starts in its run directory, the server elsewhere
        raise InvalidRequest(f"{where}: working_dir must be an absolute path (a job without "
                             "one runs in <data-dir>/runs/<job_id>)")
    program = spec.command[0]
    if "/" in program and not program.startswith("/") and spec.working_dir is None:
        raise InvalidRequest(f"{where}: command {program!r} is a relative path and there is no "
                             "working_dir for it to be relative to; give an absolute path, or "
                             "a working_dir")
    cost = spec.estimated_cost
    if cost is not None and (not math.isfinite(cost) or cost < 0):
        raise InvalidRequest(f"{where}: estimated_cost must be a finite number, 0 or more")
    return spec


def _toml_string(text: str) -> str:
    # A JSON string literal is a TOML basic string, except that TOML wants DEL escaped.
    return msgspec.json.encode(text).decode("utf-8").replace("\x7f", "\\u007F")


def config_to_toml(spec: ConfigSpec) -> str:
    """The config as a TOML document in the field order of SPEC section 2."""
    lines = ["command = [" + ", ".join(_toml_string(arg) for arg in spec.command) + "]"]
    if spec.num_processes is not None:
        lines.append(f"num_processes = {spec.num_processes}")
    if spec.device_ids is not None:
        lines.append("device_ids = [" + ", ".join(str(i) for i in spec.device_ids) + "]")
    if spec.env:
        pairs = ", ".join(f"{_toml_string(k)} = {_toml_string(v)}" for k, v in spec.env.items())
        lines.append("env = { " + pairs + " }")
    if spec.working_dir is not None:
        lines.append(f"working_dir = {_toml_string(spec.working_dir)}")
    if spec.estimated_cost is not None:
        lines.append(f"estimated_cost = {float(spec.estimated_cost)!r}")
    return "\n".join(lines) + "\n"


def _parse(name: str, path: Path, raw: bytes) -> ConfigSpec:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"config {name!r} ({path}) is not valid TOML: {exc}") from exc
    try:
        spec = msgspec.convert(data, ConfigSpec)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"config {name!r} ({path}) is invalid: {exc}") from exc
    return check_config(name, spec)


# What a config's file looked like: size, mtime, ctime, inode, device. None: not stat-able.
_Key = tuple[int, int, int, int, int] | None
# A config as last looked at: when, its key, and its parse (or why it has none).
_Loaded = tuple[float, _Key, ConfigSpec | InvalidRequest]


def _key(found: os.stat_result) -> tuple[int, int, int, int, int]:
    return (found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev)


class ConfigStore:
    """The configs directory, with parsed files cached by their ``stat``."""

    def __init__(self, directory: str | Path, *, recheck_seconds: float = 1.0) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # answered on use, as ConfigsUnavailable naming the directory and the error
        self.recheck_seconds = recheck_seconds
        self._cache: dict[str, _Loaded] = {}

    def path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.toml"

    def _unusable(self, doing: str, exc: OSError) -> ConfigsUnavailable:
        return ConfigsUnavailable(
            f"the server cannot {doing} its configs directory {self.directory}: {exc}. "
            f"It must be a directory that the server's user (uid {os.geteuid()}) can read, "
            "enter and write; fix it on the server, then try again"
        )

    def names(self) -> list[str]:
        """Every name with a ``<name>.toml`` entry on disk, sorted, whatever the entry is:
        one that is not a readable file is listed, and :meth:`get` says what is wrong."""
        try:
            with os.scandir(self.directory) as entries:
                found = [entry.name[: -len(".toml")] for entry in entries
                         if entry.name.endswith(".toml")]
        except FileNotFoundError:
            return []  # no directory, no configs; a put creates it
        except OSError as exc:
            raise self._unusable("list", exc) from None
        return sorted(name for name in found if _is_name(name))  # a listed name can be fetched

    def get(self, name: str) -> ConfigSpec:
        """The parsed config; :class:`UnknownConfig`, :class:`InvalidRequest` or
        :class:`ConfigsUnavailable`."""
        if not _is_name(name):
            raise UnknownConfig(f"no config named {name!r} ({NAME_RULE})")
        cached = self._cache.get(name)
        now = time.monotonic()
        if cached is None or now - cached[0] >= self.recheck_seconds:
            cached = self._load(name, now, cached)
        result = cached[2]
        if isinstance(result, InvalidRequest):
            raise InvalidRequest(result.detail)
        return result

    def _load(self, name: str, now: float, cached: _Loaded | None) -> _Loaded:
        path = self.path(name)
        try:
            found = os.stat(path)
        except OSError as exc:
            loaded = (now, None, self._unfollowed(name, path, exc))
            self._cache[name] = loaded
            return loaded
        key = _key(found)
        if cached is not None and cached[1] is not None and cached[1] == key:
            result = cached[2]
        elif stat_mode.S_ISDIR(found.st_mode):
            result = InvalidRequest(f"config {name!r} ({path}) is a directory, not a file")
        elif not stat_mode.S_ISREG(found.st_mode):  # a FIFO would block the read for good
            result = InvalidRequest(f"config {name!r} ({path}) is not a regular file")
        else:
            try:
                result = _parse(name, path, path.read_bytes())
            except InvalidRequest as exc:
                result = exc
            except OSError as exc:  # read again at the next look, whatever the stat says
                result = InvalidRequest(f"config {name!r} ({path}) cannot be read: {exc}")
                key = None
        loaded = (now, key, result)
        self._cache[name] = loaded
        return loaded

    def _unfollowed(self, name: str, path: Path, exc: OSError) -> InvalidRequest:
        """Why ``path`` could not be looked at: no such config, a directory the server
        cannot use, or an entry of its own that leads nowhere (a dangling symlink)."""
        try:
            os.lstat(path)
        except FileNotFoundError:
            self._cache.pop(name, None)
            raise UnknownConfig(
                f"no config named {name!r}: create {path} or PUT /api/configs/{name}"
            ) from None
        except OSError as directory_error:  # not a directory, or cannot be entered
            self._cache.pop(name, None)
            raise self._unusable("read", directory_error) from None
        # the entry is there: it is a symbolic link whose target cannot be reached
        try:
            target = f" to {os.readlink(path)!r}"
        except OSError:
            target = ""
        if isinstance(exc, FileNotFoundError):
            return InvalidRequest(f"config {name!r} ({path}) is a symbolic link{target}, "
                                  "which does not exist")
        return InvalidRequest(f"config {name!r} ({path}) cannot be read: {exc}")

    def put(self, name: str, spec: ConfigSpec) -> ConfigSpec:
        """Check and write a config atomically; returns it as it reads back from disk."""
        path = self.path(name)
        check_config(name, spec)
        text = config_to_toml(spec)
        if _parse(name, path, text.encode("utf-8")) != spec:
            raise InvalidRequest(f"config {name!r} cannot be written as TOML faithfully")
        try:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)  # again, if it was removed
            except FileExistsError:  # its own words would be "File exists"
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         str(self.directory)) from None
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
        except OSError as exc:
            raise self._unusable("write to", exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, IsADirectoryError):
                raise Conflict(f"config {name!r} cannot be written: {path} is a directory; "
                               "remove it first") from None
            if isinstance(exc, OSError):  # a full disk, a read-only file system, ...
                raise self._unusable("write to", exc) from None
            raise
        self._cache.pop(name, None)
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:  # the file is in place; only its durability is in doubt
            log.warning("configs_directory_not_synced", directory=str(self.directory),
                        error=str(exc))
        return self.get(name)
