"""Job configs over HTTP: list and read for everyone, ``PUT`` for admins (SPEC section 7).

The files are the truth (``<data-dir>/configs/<name>.toml``); a PUT writes one
atomically. File access runs in a worker thread, off the event loop. A configs directory
the server cannot use is a 503 naming it and the operating system's error (see
:class:`service.configs.ConfigsUnavailable`).
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Router, get, put
from litestar.params import FromPath, JSONBody

from service.api.auth import CurrentActor
from service.api.context import runtime_of
from service.api.errors import error_responses
from service.api.models import ConfigBody, ConfigListing, ConfigOut, InvalidConfig
from service.commands import ConfigSpec, InvalidRequest, gpu_count, require_admin

__all__ = ["configs_router"]

log = structlog.get_logger("gpuyard.api")


def _config_out(name: str, spec: ConfigSpec) -> ConfigOut:
    return ConfigOut(name=name, command=list(spec.command),
                     num_processes=gpu_count(spec.num_processes, spec.device_ids),
                     device_ids=None if spec.device_ids is None else list(spec.device_ids),
                     env=dict(spec.env), working_dir=spec.working_dir,
                     estimated_cost=spec.estimated_cost)


@get("/", sync_to_thread=True, responses=error_responses(401, 503), summary="List configs")
def list_configs(request: Request[Any, Any, Any], actor: CurrentActor) -> ConfigListing:
    """Every config; a ``<name>.toml`` that cannot be used (does not parse, cannot be read,
    is a directory, a symbolic link to nothing) is listed under ``invalid`` with the reason
    ``GET /api/configs/{name}`` gives. A missing configs directory holds none."""
    store = runtime_of(request).configs
    good: list[ConfigOut] = []
    bad: list[InvalidConfig] = []
    for name in store.names():
        try:
            good.append(_config_out(name, store.get(name)))
        except InvalidRequest as exc:
            bad.append(InvalidConfig(name=name, error=exc.detail))
    return ConfigListing(configs=good, invalid=bad)


@get("/{name:str}", sync_to_thread=True, responses=error_responses(401, 404, 422, 503),
     summary="Read a config")
def get_config(request: Request[Any, Any, Any], actor: CurrentActor,
               name: FromPath[str]) -> ConfigOut:
    return _config_out(name, runtime_of(request).configs.get(name))


@put("/{name:str}", sync_to_thread=True,
     responses=error_responses(400, 401, 403, 409, 413, 422, 503), summary="Write a config")
def put_config(request: Request[Any, Any, Any], actor: CurrentActor, name: FromPath[str],
               data: JSONBody[ConfigBody]) -> ConfigOut:
    """Admins only. Writes ``<name>.toml`` with these fields (creating the configs
    directory if it is gone); jobs already submitted keep the config they were submitted
    with. 409 if ``<name>.toml`` is a directory; 503 if the directory cannot be written."""
    require_admin(actor, "writing configs")
    spec = ConfigSpec(command=list(data.command), num_processes=data.num_processes,
                      device_ids=data.device_ids, env=dict(data.env),
                      working_dir=data.working_dir, estimated_cost=data.estimated_cost)
    written = runtime_of(request).configs.put(name, spec)
    log.info("config_written", name=name)
    return _config_out(name, written)


configs_router = Router(path="/api/configs", route_handlers=[list_configs, get_config, put_config],
                        tags=["configs"])
