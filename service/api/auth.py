"""Who is calling (SPEC section 6): the ``actor`` dependency and the read-side permissions.

While no user exists, every request acts as the built-in local admin (single-user mode).
Once one does, every ``/api/*`` request needs ``Authorization: Bearer <token>``; the
token's sha256 is looked up in the committed state. A missing or unknown token is
:class:`Unauthenticated` (401). :func:`authentication_middleware` runs for every route,
so an ``/api`` route that forgets to ask for ``actor`` is still protected; the dependency
``actor`` reuses what it found.

Permissions live in ``service.commands``: writes are checked by the command handler,
reads (which never reach it) call its ``require_admin`` and ``visible_job``.
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.types import ASGIApp, Receive, Scope, Send

from projections.state import QueueState
from service.commands import LOCAL_ADMIN, Actor
from service.ids import token_hash

__all__ = [
    "Unauthenticated", "current_actor", "actor_of_scope", "authentication_middleware",
    "actor_dependency", "Actor", "CurrentActor",
]

_ACTOR_KEY = "gpuyard.actor"
_BEARER = "bearer "


class Unauthenticated(Exception):
    """No valid bearer token on a request that needs one (401)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def actor_for_token(state: QueueState, authorization: str | None) -> Actor:
    """The actor an ``Authorization`` header stands for, in the given state."""
    if not state.users:
        return LOCAL_ADMIN
    if not authorization:
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>' "
                              "(an admin creates tokens with POST /api/users/{id}/tokens)")
    if authorization[:7].lower() != _BEARER:
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    token_id = state.token_by_hash.get(token_hash(authorization[7:].strip()))
    token = state.tokens.get(token_id) if token_id is not None else None
    user = state.users.get(token.user_id) if token is not None else None
    if user is None:
        raise Unauthenticated("unknown or revoked token")
    return Actor(user_id=user.user_id, name=user.name, level=user.level, team_id=user.team_id)


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def actor_of_scope(scope: Scope) -> Actor:
    """The caller of this request, resolved once and kept in the scope."""
    actor = scope.get(_ACTOR_KEY)  # type: ignore[call-overload]
    if actor is None:
        state = scope["litestar_app"].state.runtime.engine.state
        actor = actor_for_token(state, _authorization(scope))
        scope[_ACTOR_KEY] = actor  # type: ignore[literal-required]
        structlog.contextvars.bind_contextvars(actor=actor.label)
    return actor  # type: ignore[no-any-return]


def current_actor(request: ASGIConnection[Any, Any, Any, Any]) -> Actor:
    """The ``actor`` dependency (Litestar hands a dependency its ``request`` by that name)."""
    return actor_of_scope(request.scope)


def authentication_middleware(app: ASGIApp) -> ASGIApp:
    """Every ``/api`` request needs a caller, whether or not its route asks for ``actor``.

    (A middleware rather than a guard: Litestar copies the route handler for each guard
    call, which costs more than the check itself.)
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            actor_of_scope(scope)
        await app(scope, receive, send)

    return middleware


actor_dependency = Provide(current_actor, sync_to_thread=False)

CurrentActor = NamedDependency[Actor]
"""How a route asks for its caller: ``actor: CurrentActor`` (``actor: Actor`` works too)."""

