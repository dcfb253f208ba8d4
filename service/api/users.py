"""Users and tokens (SPEC section 6), admin only (the local admin in single-user mode).

A token is random, shown once in the answer that creates it, and stored only as its
sha256. Creating the first user ends single-user mode (of any level, as SPEC section 7
says; create an admin first, or come back in with ``gpuyard users add --data-dir``).
"""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Response, Router, delete, get, patch, post
from litestar.params import FromPath, JSONBody

from projections.state import QueueState
from service.api.auth import CurrentActor
from service.api.context import engine_of, request_id_of
from service.api.errors import error_responses
from service.api.models import (
    TokenCreated,
    TokenInfo,
    TokenRevokedResponse,
    UserCreate,
    UserCreated,
    UserListing,
    UserOut,
    UserUpdate,
    sent_fields,
)
from service.commands import CreateUser, IssueToken, RevokeToken, UpdateUser, require_admin
from service.ids import new_token, new_token_id, token_hash

__all__ = ["users_router"]

log = structlog.get_logger("gpuyard.api")

_BODY_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503)


def _user_out(state: QueueState, user_id: FromPath[int]) -> UserOut:
    user = state.users[user_id]
    tokens = sorted(t.token_id for t in state.tokens.values() if t.user_id == user_id)
    return UserOut(user_id=user.user_id, name=user.name, level=user.level, team_id=user.team_id,
                   tokens=[TokenInfo(token_id=token_id) for token_id in tokens])


@get("/", sync_to_thread=False, responses=error_responses(401, 403), summary="List users")
def list_users(request: Request[Any, Any, Any], actor: CurrentActor) -> UserListing:
    """Every user with the ids of their tokens (never the tokens)."""
    require_admin(actor, "listing users")
    state = engine_of(request).state
    return UserListing(users=[_user_out(state, user_id) for user_id in sorted(state.users)],
                       single_user_mode=not state.users)


@post("/", status_code=201, responses=_BODY_ERRORS, summary="Create a user")
async def create_user(request: Request[Any, Any, Any], actor: CurrentActor,
                      data: JSONBody[UserCreate]) -> UserCreated:
    """``{name, level, team_id?}``; the answer holds the user's first token, shown once.
    Creating the first user ends single-user mode."""
    token = new_token()
    command = CreateUser(name=data.name, level=data.level, team_id=data.team_id,
                         token_id=new_token_id(), token_hash=token_hash(token))
    engine = engine_of(request)
    outcome = (await engine.execute(command, actor, request_id_of(request))).outcome
    assert outcome.user_id is not None
    user = engine.state.users[outcome.user_id]
    log.info("user_created", user_id=user.user_id, level=user.level)
    return UserCreated(user_id=user.user_id, name=user.name, level=user.level,
                       team_id=user.team_id, token=token, token_id=command.token_id)


@patch("/{user_id:int}", responses=_BODY_ERRORS, summary="Change a user")
async def update_user(request: Request[Any, Any, Any], actor: CurrentActor, user_id: FromPath[int],
                      data: JSONBody[UserUpdate]) -> UserOut:
    """Only the fields sent change; ``team_id: null`` takes the user out of their team.
    The last admin cannot be demoted."""
    engine = engine_of(request)
    await engine.execute(UpdateUser(user_id=user_id, changes=sent_fields(data)), actor,
                         request_id_of(request))
    return _user_out(engine.state, user_id)


@post("/{user_id:int}/tokens", status_code=201, responses=error_responses(401, 403, 404, 503),
      summary="Issue a token")
async def issue_token(request: Request[Any, Any, Any], actor: CurrentActor,
                      user_id: FromPath[int]) -> TokenCreated:
    """A new token for the user, shown this once."""
    token = new_token()
    command = IssueToken(user_id=user_id, token_id=new_token_id(), token_hash=token_hash(token))
    await engine_of(request).execute(command, actor, request_id_of(request))
    return TokenCreated(user_id=user_id, token_id=command.token_id, token=token)


@delete("/{user_id:int}/tokens/{token_id:str}", status_code=200,
        responses=error_responses(401, 403, 404, 503), summary="Revoke a token")
async def revoke_token(request: Request[Any, Any, Any], actor: CurrentActor, user_id: FromPath[int],
                       token_id: FromPath[str]) -> Response[TokenRevokedResponse]:
    command = RevokeToken(user_id=user_id, token_id=token_id)
    await engine_of(request).execute(command, actor, request_id_of(request))
    return Response(TokenRevokedResponse(success=True, user_id=user_id, token_id=token_id))


users_router = Router(
    path="/api/users",
    route_handlers=[list_users, create_user, update_user, issue_token, revoke_token],
    tags=["users"],
)
