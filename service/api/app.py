"""The Litestar application over a :class:`service.runtime.Runtime`.

``create_app(runtime)`` wires the routers, the ``actor`` dependency and the guard that
authenticates every ``/api`` route, the one error mapper, the request id, the 1 MiB body
limit and the OpenAPI document at ``/schema`` (also ``/schema/openapi.json`` and
``/schema/openapi.yaml``; pages to browse it at ``/schema/redoc`` and ``/schema/swagger``).
Its lifespan runs ``runtime.running()``: the engine, the inventory record and the local
executor live as long as the app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.openapi.spec import Components, SecurityScheme

from service.api.audit import audit_router
from service.api.auth import actor_dependency, authentication_middleware
from service.api.configs import configs_router
from service.api.errors import EXCEPTION_HANDLERS, MAX_BODY_BYTES
from service.api.panel import panel_router
from service.api.queue_actions import queue_router
from service.api.read_cache import ReadCache
from service.api.strict_body import check_body_types
from service.api.request_id import echo_request_id, request_id_middleware
from service.api.system import system_router
from service.api.users import users_router
from service.commands import Actor
from service.runtime import Runtime

__all__ = ["create_app"]

API_VERSION = "1.0.0"


def create_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def run_runtime(_: Litestar) -> AsyncIterator[None]:
        async with runtime.running():
            yield

    openapi = OpenAPIConfig(
        title="gpuyard",
        version=API_VERSION,
        description="A job queue for GPU training jobs (SPEC section 7). While no user "
                    "exists every request acts as the local admin; after that, send "
                    "'Authorization: Bearer <token>'.",
        path="/schema",
        # SPEC section 7: "OpenAPI is served at /schema", so the document itself is there
        render_plugins=[JsonRenderPlugin(path=["/openapi.json", "/"]),
                        YamlRenderPlugin(path="/openapi.yaml"),
                        RedocRenderPlugin(path="/redoc"), SwaggerRenderPlugin(path="/swagger")],
        create_examples=False,
        components=Components(security_schemes={
            "BearerToken": SecurityScheme(type="http", scheme="bearer",
                                          description="a token from POST /api/users"),
        }),
        security=[{"BearerToken": []}],
    )
    return Litestar(
        route_handlers=[queue_router, users_router, configs_router,
                        audit_router, panel_router, system_router],
        dependencies={"actor": actor_dependency},
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[request_id_middleware, authentication_middleware],
        before_send=[echo_request_id],
        before_request=check_body_types,
        lifespan=[run_runtime],
        state=State({"runtime": runtime, "read_cache": ReadCache()}),
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=openapi,
        logging_config=None,
        signature_namespace={"Actor": Actor},
    )
