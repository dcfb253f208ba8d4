"""The queue panel (issue 6): one static page at ``/`` and the two small reads it needs.

The page (``service/panel/index.html`` with ``panel.js`` and ``panel.css`` under
``/panel/``) is plain HTML and JavaScript: no build step. Every figure, row and action
goes through the public API with the viewer's own token, so the server enforces every
permission; the page only hides what the viewer may not do.

Two reads exist for the page and are part of the API:

- ``GET /api/whoami``: the caller (``user_id``, ``name``, ``level``, ``team_id``) and
  whether the server is in single-user mode, so the page knows which actions to offer;
- ``GET /api/panel/changes``: ``{"seq": N}``, the sequence number of the last committed
  event. The page asks for it once a second and reloads its data only when it moved, so
  an idle panel costs the server one tiny read per second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Request, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.enums import MediaType
from litestar.static_files import create_static_files_router
from msgspec import Struct

from service.api.auth import CurrentActor
from service.api.context import engine_of
from service.api.errors import error_responses

__all__ = ["PANEL_DIR", "PanelChanges", "WhoAmI", "panel_router"]

PANEL_DIR = Path(__file__).resolve().parent.parent / "panel"
INDEX_FILE = PANEL_DIR / "index.html"
INDEX_PAGE = INDEX_FILE.read_bytes()  # read once: GET / never touches the disk

# The page loads only its own script and stylesheet and talks only to this server; every
# string from the API is inserted as text, never as markup.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class WhoAmI(Struct, kw_only=True):
    """The caller as the server sees it; ``user_id`` 0 is the built-in local admin."""

    user_id: int
    name: str
    level: str
    team_id: str | None
    single_user_mode: bool


class PanelChanges(Struct, kw_only=True):
    """The sequence number of the last committed event: it moves on every change."""

    seq: int


@get("/", sync_to_thread=False, include_in_schema=False, media_type=MediaType.HTML)
def panel_page() -> Response[bytes]:
    """The queue panel."""
    return Response(INDEX_PAGE, media_type=MediaType.HTML,
                    headers=SECURITY_HEADERS)


@get("/api/whoami", sync_to_thread=False, responses=error_responses(401),
     summary="Who is calling", tags=["panel"])
def whoami(request: Request[Any, Any, Any], actor: CurrentActor) -> WhoAmI:
    """The caller's id, name, level and team; in single-user mode the local admin."""
    state = engine_of(request).state
    return WhoAmI(user_id=actor.user_id, name=actor.name, level=actor.level,
                  team_id=actor.team_id, single_user_mode=not state.users)


@get("/api/panel/changes", sync_to_thread=False, responses=error_responses(401),
     summary="The last committed event's sequence number", tags=["panel"])
def panel_changes(request: Request[Any, Any, Any], actor: CurrentActor) -> PanelChanges:
    """``seq`` grows with every committed event: poll it, reload when it moves."""
    return PanelChanges(seq=engine_of(request).state.last_seq)


panel_assets = create_static_files_router(
    path="/panel",
    directories=[PANEL_DIR],
    name="panel",
    cache_control=CacheControlHeader(no_cache=True),
    include_in_schema=False,
)

panel_router = Router(path="/", route_handlers=[panel_page, whoami, panel_changes, panel_assets])
