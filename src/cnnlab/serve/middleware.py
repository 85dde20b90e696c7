"""What wraps every route of the explorer: who may talk to it, the headers of every answer, and 500s.

A server on 127.0.0.1 is still reachable from any web page the user opens: through DNS rebinding (a
name the attacker controls resolved to 127.0.0.1, so the page's requests reach this server as
same-origin ones, with ``Host: evil.example``), and through a cross-site form or ``fetch`` (which the
browser sends without asking, though it keeps the answer from the page). :class:`SameOrigin` answers
only requests whose ``Host`` is a name the server was started for, and takes a request that changes
something (a POST: an upload) only from the app's own page.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.core.errors import UserError

__all__ = ["CSP", "LOOPBACK", "SameOrigin", "SecurityHeaders", "ServerErrors", "allowed_hosts", "error"]

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # what this machine's browser calls it
WILDCARDS = ("", "0.0.0.0", "::")  # addresses that mean every interface, not a name to be reached by
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A Host header (or an Origin's part after the scheme): a DNS name or IPv4 address, or an IPv6 address in
# brackets, and maybe a port. Anything else (user info, a path, other characters) is refused as it is.
HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9.-]{1,253}))(?::(?P<port>[0-9]{1,5}))?")
NAME = re.compile(r"\[?(?P<name>[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45})\]?")


def error(status: int, message: str) -> JSONResponse:
    """The answer to a request that cannot be served: its status and what to do, as the page shows it."""
    return JSONResponse({"error": message}, status_code=status)


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The host names the explorer answers to: this machine's loopback names, the address ``host`` it
    listens on unless that means every interface (``0.0.0.0``), and ``extra`` (a ``UserError`` for one
    that is not a host name)."""
    extra = list(extra)
    for name in extra:
        if not NAME.fullmatch(name):
            raise UserError(f"`allow_hosts`: {name!r} is not a host name or address; give one such as "
                            "myhost.local or 192.168.1.20, without a scheme or port")
    # A `host` that is no name is left out here: listening on it fails, saying so.
    given = [] if host in WILDCARDS or not NAME.fullmatch(host) else [host]
    names = list(LOOPBACK)
    for name in given + extra:
        bare = NAME.fullmatch(name)["name"].lower()
        if bare not in names:
            names.append(bare)
    return tuple(names)


def _host_and_port(value: str) -> tuple[str, int | None] | None:
    m = HOST.fullmatch(value)
    if not m:
        return None
    return (m["v6"] or m["name"]).lower(), None if m["port"] is None else int(m["port"])


def _shown(host: str, port: int | None) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port is None else f"{name}:{port}"


class SameOrigin:
    """Answers only requests addressed to ``hosts`` (and to ``port``, when the Host header names one and
    ``port`` is given), with 400 and a message otherwise; refuses a request of another method than GET,
    HEAD or OPTIONS, with 403, when its ``Origin`` is not the server's own (or, lacking one, its
    ``Sec-Fetch-Site`` says another site sent it).

    Starlette's ``TrustedHostMiddleware`` checks the name alone and answers ``Invalid host header``; this
    one checks the port too and says which names the server answers to and how to add one.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str] = LOOPBACK, port: int | None = None) -> None:
        self.app, self.hosts, self.port = app, tuple(hosts), port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refused = self._refused_host(headers.get("host", "")) or self._refused_origin(scope["method"], headers)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refused_host(self, value: str) -> JSONResponse | None:
        parsed = _host_and_port(value)
        if parsed is not None and parsed[0] in self.hosts and (parsed[1] is None or self.port in (None, parsed[1])):
            return None
        names = ", ".join(_shown(h, self.port) for h in self.hosts)
        return error(400, f"this server answers to {names}, not to the host {value[:100]!r}; open it at one of "
                          "these (cnnlab serve --allow-host NAME adds a name)")

    def _refused_origin(self, method: str, headers: Headers) -> JSONResponse | None:
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            scheme, _, rest = origin.partition("://")
            ours = _host_and_port(headers["host"])  # checked above
            if scheme in ("http", "https") and _host_and_port(rest) == ours:
                return None
            return error(403, f"refused: a {method} must come from this app's own page, not from {origin[:100]!r}")
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return error(403, f"refused: a {method} must come from this app's own page, not from another site")
        return None  # not from a browser (curl, a script): nothing to forge


class SecurityHeaders:
    """Adds the CSP and its companions to every response, errors and 404s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


class ServerErrors:
    """A 500 for any exception a route lets through (a bug), logged as one line that says what failed
    where: the path, the exception's type and message (the traceback goes with the record, for a
    logging set-up that prints it; ``cnnlab serve`` prints the line alone).

    Starlette's own ``ServerErrorMiddleware`` sits outside every other middleware, so its 500 would lack
    the security headers, and it raises the exception on to the server, which logs it once more.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            request = Request(scope)
            log.error("%s %s answered 500: %s: %s", request.method, request.url.path, type(e).__name__, e,
                      exc_info=True)
            if not started:
                await error(500, "the server failed on this request; its log says why")(scope, receive, send)
