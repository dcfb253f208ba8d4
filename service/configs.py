"""Job configs: TOML files ``<data-dir>/configs/<name>.toml`` (SPEC section 2).

A config is read with :mod:`tomllib` into :class:`service.commands.ConfigSpec`; a file is
parsed again only when its size or modification time changes, and looked at (``stat``)
at most once per ``recheck_seconds`` (1 s): a system call costs tens of microseconds on
a small VM and every submission resolves a config. An edit made to a file directly is
therefore seen within a second; a ``put`` is seen at once. ``put`` writes TOML
atomically (temporary file, fsync, rename) after checking that it reads back to the
same config. An unknown name is :class:`UnknownConfig` (404); a file that does not parse
or holds wrong fields is :class:`InvalidRequest` (422) whose detail names the file.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import tomllib
from pathlib import Path

import msgspec

from service.commands import ConfigSpec, InvalidRequest, UnknownConfig

__all__ = ["ConfigStore", "check_config", "check_name", "config_to_toml", "NAME_RULE"]

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
    if spec.working_dir is not None and (not spec.working_dir or "\x00" in spec.working_dir):
        raise InvalidRequest(f"{where}: working_dir must be a non-empty path")
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


# A config as last looked at: when, the file's (size, mtime, inode), and its parse.
_Loaded = tuple[float, tuple[int, int, int], ConfigSpec | InvalidRequest]


class ConfigStore:
    """The configs directory, with parsed files cached by (size, mtime, inode)."""

    def __init__(self, directory: str | Path, *, recheck_seconds: float = 1.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.recheck_seconds = recheck_seconds
        self._cache: dict[str, _Loaded] = {}

    def path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.toml"

    def names(self) -> list[str]:
        """Every config name on disk, sorted."""
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".toml") and entry.is_file():
                name = entry.name[: -len(".toml")]
                if _is_name(name):  # a listed name can always be fetched
                    found.append(name)
        return sorted(found)

    def get(self, name: str) -> ConfigSpec:
        """The parsed config; :class:`UnknownConfig` or :class:`InvalidRequest`."""
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
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(name, None)
            raise UnknownConfig(
                f"no config named {name!r}: create {path} or PUT /api/configs/{name}"
            ) from None
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if cached is not None and cached[1] == key:
            result = cached[2]
        else:
            try:
                result = _parse(name, path, path.read_bytes())
            except InvalidRequest as exc:
                result = exc
            except OSError as exc:
                result = InvalidRequest(f"config {name!r} ({path}) cannot be read: {exc}")
        loaded = (now, key, result)
        self._cache[name] = loaded
        return loaded

    def put(self, name: str, spec: ConfigSpec) -> ConfigSpec:
        """Check and write a config atomically; returns it as it reads back from disk."""
        path = self.path(name)
        check_config(name, spec)
        text = config_to_toml(spec)
        if _parse(name, path, text.encode("utf-8")) != spec:
            raise InvalidRequest(f"config {name!r} cannot be written as TOML faithfully")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._cache.pop(name, None)
        return self.get(name)
