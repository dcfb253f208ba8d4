"""A small HTTP client for the gpuyard API (SPEC section 7), used by the CLI.

Every failure becomes one :class:`ClientError` whose message is a single line a person
can act on: the server is not reachable, the token is refused (401), the job does not
exist (404), or the server's own ``detail`` for any other refusal.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote


def _import_httpx() -> types.ModuleType:
    """``import httpx`` without httpx's own command line.

    httpx imports its CLI (rich, pygments) on import when those are installed, which
    nearly doubles the start of every ``gpuyard`` command. A placeholder ``httpx._main``
    makes httpx take its documented path for an install without the CLI extras.
    """
    if "httpx" in sys.modules:
        return sys.modules["httpx"]
    placeholder = types.ModuleType("httpx._main")
    sys.modules.setdefault("httpx._main", placeholder)
    try:
        import httpx
    except ImportError:  # a future httpx that needs its real _main: import it as it is
        if sys.modules.get("httpx._main") is placeholder:
            del sys.modules["httpx._main"]
        sys.modules.pop("httpx", None)
        import httpx
    finally:
        if sys.modules.get("httpx._main") is placeholder:
            del sys.modules["httpx._main"]
    return httpx


if TYPE_CHECKING:
    import httpx
else:
    httpx = _import_httpx()

__all__ = ["DEFAULT_URL", "Client", "ClientError", "job_segment", "segment"]

DEFAULT_URL = "http://127.0.0.1:8000"

_STATUS_WORDS = {
    400: "bad request",
    403: "not allowed",
    404: "not found",
    409: "conflict",
    413: "too large",
    422: "invalid",
    503: "unavailable",
}


class ClientError(Exception):
    """A request that failed; ``status`` is the HTTP status, or ``None`` if none came back."""

    def __init__(self, message: str, status: int | None = None, *,
                 unreachable: bool = False) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status
        self.unreachable = unreachable  # no server answered, or it went away mid-answer


def _not_text() -> ClientError:
    """An argument the shell passed as bytes that are not text (Python keeps them as
    surrogates, which cannot be sent)."""
    return ClientError("an argument is not valid UTF-8 text; check its quoting and the "
                       "terminal's encoding")


def segment(value: object) -> str:
    """One path segment (a job id, a user id): escaped, so that ``?``, ``#`` or ``/`` in it
    cannot reach another route; an empty one, ``.`` or ``..`` cannot either."""
    text = str(value)
    if not text:
        raise ClientError("an id cannot be empty")
    if text in (".", ".."):
        raise ClientError(f"{text!r} cannot be an id")
    try:
        return quote(text, safe="")
    except UnicodeEncodeError:
        raise _not_text() from None


# The fixed routes under /api/queue/ (SPEC section 7): no job id is one of them.
_QUEUE_ROUTES = frozenset(
    {"submit", "cancel", "stats", "me", "position", "concurrency", "process", "cleanup"})


def job_segment(job_id: str) -> str:
    """A job id as the segment after ``/api/queue/``: one that names a route of its own
    there (``stats``), or is path syntax (``..``, ``a/b``), is no job's."""
    if job_id in _QUEUE_ROUTES or job_id in (".", "..") or "/" in job_id:
        raise ClientError(f"not found: no job with id {job_id!r}", 404)
    return segment(job_id)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"])
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase


def _check_url(base_url: str) -> None:
    """Refuse a server URL that cannot be one (a path is allowed: a proxy may serve
    gpuyard under one, but not the API's own ``/api``)."""
    try:
        url = httpx.URL(base_url)
        port = url.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ClientError(f"bad server URL {base_url!r}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise ClientError(f"bad server URL {base_url!r}: use http:// or https://")
    if not url.host:
        raise ClientError(f"bad server URL {base_url!r}: it names no host")
    if port is not None and not 1 <= port <= 65535:
        raise ClientError(f"bad server URL {base_url!r}: port {port} is not 1-65535")
    if url.path.rstrip("/").endswith("/api"):
        raise ClientError(f"bad server URL {base_url!r}: give the server's address without "
                          "/api (the CLI adds it), e.g. " + DEFAULT_URL)


class Client:
    """Talks to one server as one token holder (or as nobody, in single-user mode)."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None,
                 timeout: float = 30.0) -> None:
        if not base_url.strip():
            raise ClientError("the server URL is empty; set --server or GPUYARD_URL (default "
                              f"{DEFAULT_URL})")
        if "://" not in base_url:
            base_url = f"http://{base_url}"
        _check_url(base_url)
        self.base_url = base_url.rstrip("/")
        if token is not None and (not token.isascii() or not token.isprintable()
                                  or " " in token.strip()):
            raise ClientError("the token has characters a token never has; check --token or "
                              "GPUYARD_TOKEN")
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
        try:
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        except (ValueError, httpx.InvalidURL) as exc:
            raise ClientError(f"bad server URL {base_url!r}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------ plumbing

    def _failed(self, exc: httpx.HTTPError, method: str = "GET") -> ClientError:
        if isinstance(exc, httpx.ConnectError) and "SSL" in str(exc):
            return ClientError(f"the TLS handshake with {self.base_url} failed ({exc}); is it "
                               "an https server? (plain http needs an http:// URL)",
                               unreachable=True)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ClientError(f"cannot reach the gpuyard server at {self.base_url} "
                               "(is `gpuyard serve` running? set --server or GPUYARD_URL)",
                               unreachable=True)
        # a change sent, with no answer: the server may have made it
        maybe_done = "" if method == "GET" else (
            "; it may have been carried out all the same: look (e.g. `gpuyard jobs list`) "
            "before trying again (a submit with --idempotency-key is safe to repeat)")
        if isinstance(exc, httpx.TimeoutException):
            return ClientError(f"the gpuyard server at {self.base_url} did not answer in "
                               f"time{maybe_done}", unreachable=True)
        return ClientError(f"talking to {self.base_url} failed: {exc}{maybe_done}",
                           unreachable=isinstance(exc, httpx.TransportError))

    def _refused(self, response: httpx.Response) -> ClientError:
        status = response.status_code
        detail = _detail(response)
        if status == 401:
            hint = " (give a valid token with --token or GPUYARD_TOKEN)"
            return ClientError(f"not authenticated (401): {detail}{hint}", status)
        word = _STATUS_WORDS.get(status, "refused" if status < 500 else "server error")
        return ClientError(f"{word} ({status}): {detail}", status)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None) -> httpx.Response:
        """One request; a 4xx or 5xx answer raises :class:`ClientError`."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=clean, json=json)
        except httpx.HTTPError as exc:
            raise self._failed(exc, method) from exc
        except UnicodeEncodeError:
            raise _not_text() from None
        except ValueError as exc:  # JSON has no nan or inf
            raise ClientError(f"cannot send the request: {exc}") from None
        if response.status_code >= 400:
            raise self._refused(response)
        return response

    def _answer(self, response: httpx.Response) -> Any:
        """The JSON body of a success: what every gpuyard route answers."""
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{self.base_url} answered {response.request.url.path} with "
                              "something that is not JSON; is --server (GPUYARD_URL) a "
                              "gpuyard server?") from None

    def get(self, path: str, **params: Any) -> Any:
        return self._answer(self.request("GET", path, params=params))

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self._answer(self.request("POST", path, params=params, json=body))

    def delete(self, path: str) -> Any:
        response = self.request("DELETE", path)
        return self._answer(response) if response.content else None

    @contextmanager
    def stream(self, path: str, **params: Any) -> Iterator[Iterator[bytes]]:
        """GET ``path`` and yield its body chunk by chunk, never all at once."""
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            with self._http.stream("GET", path, params=clean) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                yield self._chunks(response)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        except UnicodeEncodeError:
            raise _not_text() from None

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise ClientError(f"the stream from {self.base_url} broke off: {exc}",
                              unreachable=True) from exc
