"""The explorer's routes: one page per run, its script and style, and JSON endpoints for the panels.

Every route names a run by its position on the command line (``/run/0``, ``/api/0/…``); nothing is
ever read from disk by a name taken from a request, so a path such as ``/../`` or ``%2e%2e`` matches
no route and gets 404, as does a run that was not given. Torch work runs in worker threads
(:func:`starlette.concurrency.run_in_threadpool`), never on the event loop, and heavy results are
jobs (:mod:`cnnlab.serve.jobs`) that answer at once with their progress. Every response carries a
strict Content-Security-Policy: the page runs only the app's own script and style, and may talk to
no host but this one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.core.errors import UserError
from cnnlab.serve import pages
from cnnlab.serve.runs import Served, choose, confusion, thumbnails
from cnnlab.serve.store import Image

__all__ = ["CSP", "MAX_UPLOAD", "create_app"]

log = logging.getLogger(__name__)

MAX_UPLOAD = 20 * 1024 * 1024  # bytes; enforced while reading, before the image is decoded
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runs: list[Served]) -> Starlette:
    """The ASGI application serving ``runs`` (already loaded)."""
    static = {name: resources.files("cnnlab.serve").joinpath("static", name).read_bytes()
              for name in ("app.js", "app.css")}

    def served(request: Request) -> Served:
        rid = request.path_params["rid"]
        if rid >= len(runs):
            raise LookupError(rid)
        return runs[rid]

    def image_of(s: Served, request: Request) -> Image:
        return s.pixels(request.query_params.get("image", ""), runs)

    def optional_int(request: Request, name: str) -> int | None:
        value = request.query_params.get(name, "")
        if value == "":
            return None
        if not value.isdigit() or len(value) > 9:
            raise UserError(f"{name} must be a whole number (got {value[:20]!r})")
        return int(value)

    def api(work: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A JSON endpoint whose ``work`` runs in a worker thread; a user mistake is a 400 with its message,
        an unknown run or image a 404."""

        async def endpoint(request: Request) -> Response:
            try:
                result = await run_in_threadpool(work, request)
            except LookupError:
                return _error(404, "not found (the image may have been forgotten: upload or pick it again)")
            except UserError as e:
                return _error(400, str(e))
            except Exception:
                log.exception("%s failed", request.url.path)
                return _error(500, "the server failed on this request; its log says why")
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    async def home(request: Request) -> Response:
        return RedirectResponse("/run/0", status_code=303)

    async def page(request: Request) -> Response:
        rid = request.path_params["rid"]
        if rid >= len(runs):
            return _error(404, "not found")
        return HTMLResponse(pages.page(runs, rid))

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return _error(404, "not found")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(static[name], media_type=f"{kind}; charset=utf-8")

    async def upload(request: Request) -> Response:
        try:
            s = served(request)
        except LookupError:
            return _error(404, "not found")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_UPLOAD:
            return _error(413, f"the file is larger than {MAX_UPLOAD // 2**20} MB; give a smaller image")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a lying Content-Length changes nothing
            size += len(chunk)
            if size > MAX_UPLOAD:
                return _error(413, f"the file is larger than {MAX_UPLOAD // 2**20} MB; give a smaller image")
            chunks.append(chunk)
        if size == 0:
            return _error(400, "the upload is empty; give an image file")
        data = b"".join(chunks)
        name = request.query_params.get("name", "upload")[:200]

        def decode() -> dict[str, Any]:
            # Each served run reads the image as its own `cnnlab predict` would (size, channels).
            pixels = {r.index: r.decode(data) for r in runs}
            ref = s.images.put(Image(name, pixels))
            return {"image": ref, "name": name}

        try:
            return JSONResponse(await run_in_threadpool(decode))
        except UserError as e:
            return _error(415, f"{name} is not an image cnnlab can read: {e}")

    def predict(request: Request) -> Any:
        s = served(request)
        tta = request.query_params.get("tta")
        return s.predict(image_of(s, request), None if tta is None else tta == "1")

    def explain(request: Request) -> Any:
        s = served(request)
        return s.explain(image_of(s, request), request.query_params.get("method", "grad-cam"),
                         optional_int(request, "target"), request.query_params.get("layer") or None)

    def features(request: Request) -> Any:
        s = served(request)
        return s.features(image_of(s, request), request.query_params.get("layer") or s.default_layer)

    def channel(request: Request) -> Any:
        s = served(request)
        layer = request.query_params.get("layer") or s.default_layer
        c = optional_int(request, "channel") or 0
        count = s.channels_of(layer)
        if c >= count:
            raise UserError(f"{layer} has {count} channels (0 … {count - 1}); channel {c} is out of range")
        top = s.top_images(layer, c)
        out: dict[str, Any] = {"layer": layer, "channel": c, "filters": s.filters(layer, c),
                               "top": top.to_json(), "maximize": s.maximized(layer, c).to_json()}
        if top.result is not None:
            out["top"]["result"] = {**top.result, "thumbs": s.test_thumbnails(top.result["indices"])}
        return out

    def trust(request: Request) -> Any:
        return served(request).trust().to_json()

    def curves(request: Request) -> Any:
        return {"curves": served(request).curves()}

    def run_confusion(request: Request) -> Any:
        s = served(request)
        status = s.scores()
        state = {k: v for k, v in status.to_json().items() if k != "result"}
        return {"status": state, "confusion": confusion(status, s.classes),
                "classes": s.classes}

    def browse(request: Request) -> Any:
        s = served(request)
        status = s.scores()
        if status.result is None:
            return {"status": status.to_json()}
        which = request.query_params.get("filter", "")
        indices = choose(status, which, s.classes)
        return {"status": {"state": "done"}, "filter": which, "count": len(indices),
                "images": thumbnails(s, status, indices)}

    routes = [
        Route("/", home),
        Route("/run/{rid:int}", page),
        Route("/static/{name}", asset),
        Route("/api/{rid:int}/upload", upload, methods=["POST"]),
        Route("/api/{rid:int}/predict", api(predict)),
        Route("/api/{rid:int}/explain", api(explain)),
        Route("/api/{rid:int}/features", api(features)),
        Route("/api/{rid:int}/channel", api(channel)),
        Route("/api/{rid:int}/trust", api(trust)),
        Route("/api/{rid:int}/curves", api(curves)),
        Route("/api/{rid:int}/confusion", api(run_confusion)),
        Route("/api/{rid:int}/images", api(browse)),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "not found")

    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.add_middleware(SecurityHeaders)
    return app
