"""The explorer's routes: one page per run, its script and style, and JSON endpoints for the panels.

Each endpoint is a function of the request alone; what it serves comes from ``request.app.state``
(``runs``: the served runs, ``images``: the uploads, ``jobs``: the background worker, ``static``: the
script and style), which :func:`create_app` sets. Every route names a run by its position on the
command line (``/run/0``, ``/api/0/…``); nothing is ever read from disk by a name taken from a
request, so a path such as ``/../`` or ``%2e%2e`` matches no route and gets 404, as does a run that
was not given. Every number in a request is ASCII digits, bounded (:func:`whole_number`).

The endpoints that run torch are plain functions, which Starlette runs in worker threads, never on
the event loop; heavy results are tasks (:mod:`cnnlab.serve.jobs`) that answer at once with their
progress. A user mistake (:class:`~cnnlab.core.errors.UserError`) is a 400 with its message, an
unknown run or image a 404, a full queue a 429, and anything else a 500 logged in one line
(:mod:`cnnlab.serve.middleware`, which also checks who sends each request and adds the
Content-Security-Policy to every answer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from cnnlab.core.errors import UserError
from cnnlab.serve import pages, units
from cnnlab.serve.jobs import Busy
from cnnlab.serve.middleware import CSP, LOOPBACK, SameOrigin, SecurityHeaders, ServerErrors, error
from cnnlab.serve.runs import BROWSE, Served, choose, confusion, thumbnails
from cnnlab.serve.store import Image

__all__ = ["CSP", "MAX_UPLOAD", "ROUTES", "create_app", "whole_number"]

MAX_UPLOAD = 20 * 1024 * 1024  # bytes; enforced while reading, before the image is decoded
DIGITS = re.compile(r"[0-9]+")  # not str.isdigit, which takes "²" (and int() then fails)
FORGOTTEN = "not found (the image may have been forgotten: upload or pick it again)"
TOO_LARGE = f"the file is larger than {MAX_UPLOAD // 2**20} MB; give a smaller image"


def whole_number(text: str, most: int = 10**9 - 1) -> int | None:
    """``text`` as a whole number written in ASCII digits, or None when it is not one or is over ``most``
    (at most 18 digits are read: ``int`` of thousands would take a while, and then refuse)."""
    if not DIGITS.fullmatch(text) or len(text) > 18:
        return None
    number = int(text)
    return number if number <= most else None


def _number(request: Request, name: str) -> int | None:
    """The query parameter ``name`` as a whole number; None when it is absent or empty."""
    value = request.query_params.get(name, "")
    if value == "":
        return None
    number = whole_number(value)
    if number is None:
        raise UserError(f"{name} must be a whole number (got {value[:20]!r})")
    return number


def _served(request: Request) -> Served:
    """The run the path names (``LookupError`` for one that was not given)."""
    runs: list[Served] = request.app.state.runs
    rid = whole_number(request.path_params["rid"], len(runs) - 1)
    if rid is None:
        raise LookupError(request.path_params["rid"])
    return runs[rid]


def _image(s: Served, request: Request) -> Image:
    return s.pixels(request.query_params.get("image", ""), request.app.state.runs)


# --- the page and its files ----------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/run/0", status_code=303)


async def page(request: Request) -> Response:
    try:
        s = _served(request)
    except LookupError:
        return error(404, "not found")
    return HTMLResponse(pages.page(request.app.state.runs, s.index))


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    static: dict[str, bytes] = request.app.state.static
    if name not in static:
        return error(404, "not found")
    kind = "text/javascript" if name.endswith(".js") else "text/css"
    return Response(static[name], media_type=f"{kind}; charset=utf-8")


# --- uploads ---------------------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    """The request's body, at most :data:`MAX_UPLOAD` bytes, decoded for every served run and kept in the
    image store; answers its reference."""
    try:
        _served(request)
    except LookupError:
        return error(404, "not found")
    declared = whole_number(request.headers.get("content-length", ""), most=10**18)
    if declared is not None and declared > MAX_UPLOAD:
        return error(413, TOO_LARGE)
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a lying Content-Length changes nothing
        size += len(chunk)
        if size > MAX_UPLOAD:
            return error(413, TOO_LARGE)
        chunks.append(chunk)
    if size == 0:
        return error(400, "the upload is empty; give an image file")
    data = b"".join(chunks)
    name = request.query_params.get("name", "upload")[:200]
    runs: list[Served] = request.app.state.runs

    def decode() -> dict[str, Any]:
        # Each served run reads the image as its own `cnnlab predict` would (size, channels).
        pixels = {r.index: r.decode(data) for r in runs}
        ref = request.app.state.images.put(Image(name, pixels))
        return {"image": ref, "name": name}

    try:
        return JSONResponse(await run_in_threadpool(decode))
    except UserError as e:
        return error(415, f"{name} is not an image cnnlab can read: {e}")


# --- the panels (plain functions: Starlette runs them in worker threads) ---------------------------------


def predict(request: Request) -> Response:
    s = _served(request)
    tta = request.query_params.get("tta")
    return JSONResponse(s.predict(_image(s, request), None if tta is None else tta == "1"))


def explain(request: Request) -> Response:
    s = _served(request)
    return JSONResponse(s.explain(_image(s, request), request.query_params.get("method", "grad-cam"),
                                  _number(request, "target"), request.query_params.get("layer") or None))


def features(request: Request) -> Response:
    s = _served(request)
    return JSONResponse(s.features(_image(s, request), request.query_params.get("layer") or s.default_layer))


def channel(request: Request) -> Response:
    """One channel of a layer: its filter weights now; its top test images and activation maximisation as
    the tasks' states until they are done."""
    s = _served(request)
    layer = request.query_params.get("layer") or s.default_layer
    c = _number(request, "channel") or 0
    count = s.channels_of(layer)
    if c >= count:
        raise UserError(f"{layer} has {count} channels (0 … {count - 1}); channel {c} is out of range")
    top = s.top_images(layer, c)
    out: dict[str, Any] = {"layer": layer, "channel": c, "filters": s.filters(layer, c),
                           "top": top.to_json(), "maximize": s.maximized(layer, c).to_json()}
    if top.result is not None:
        out["top"]["result"] = {**top.result, "thumbs": s.test_thumbnails(top.result["indices"])}
    return JSONResponse(out)


def trust(request: Request) -> Response:
    return JSONResponse(_served(request).trust().to_json())


def curves(request: Request) -> Response:
    return JSONResponse({"curves": _served(request).curves()})


def run_confusion(request: Request) -> Response:
    s = _served(request)
    status = s.scores()
    state = {k: v for k, v in status.to_json().items() if k != "result"}
    matrix = confusion(status, s.classes)
    answer = {"status": state, "confusion": matrix, "classes": s.classes}
    if matrix is None and status.result is not None:
        answer["error"] = (f"{len(s.classes):,} classes are too many for a confusion matrix; cnnlab evaluate "
                           "lists its cells")
    return JSONResponse(answer)


def browse(request: Request) -> Response:
    """A list of test images (``filter``: a class, the mistakes, a cell of the confusion matrix)."""
    s = _served(request)
    status = s.scores()
    if status.result is None:
        return JSONResponse({"status": status.to_json()})
    which = request.query_params.get("filter", "")
    indices = choose(status, which, s.classes)
    return JSONResponse({"status": {"state": "done"}, "filter": which, "count": len(indices),
                         "images": thumbnails(s, status, indices)})


def unit_index(request: Request) -> Response:
    """Every unit of a layer (``/run/{rid}/units/{layer}``), as ``cnnlab visualize dossier``'s index.html."""
    try:
        s = _served(request)
    except LookupError:
        return error(404, "not found")
    return units.index(s, request.path_params["layer"])


def unit(request: Request) -> Response:
    """One unit's page (``/run/{rid}/unit/{layer}/{channel}``), as ``cnnlab visualize dossier`` writes it."""
    try:
        s = _served(request)
    except LookupError:
        return error(404, "not found")
    return units.page(s, request.path_params["layer"], whole_number(request.path_params["channel"]))


def embedding(request: Request) -> Response:
    """The test set's map: the task's state until it is done, then every point."""
    return JSONResponse(_served(request).embedding().to_json())


def mistakes(request: Request) -> Response:
    """The mistakes, with thumbnails of the pairs' examples, of the top losses, and of the most and least typical
    images of ``class`` (default the first); the task's state until it is done."""
    s = _served(request)
    status = s.mistakes()
    out = status.to_json()
    found = out.get("result")
    if found is None:
        return JSONResponse(out)
    chosen = _number(request, "class") or 0
    if chosen >= len(s.classes):
        raise UserError(f"class {chosen} is out of range (0 … {len(s.classes) - 1})")
    typical = [t for t in found["typical"] if t["label"] == chosen]
    shown = [i for p in found["pairs"] for i in p["examples"]] + [x["index"] for x in found["losses"]]
    shown += [i for t in typical for i in t["most"] + t["least"]]
    unique = list(dict.fromkeys(shown))
    thumbs = dict(zip(map(str, unique), s.test_thumbnails(unique)))
    out["result"] = {**found, "typical": typical, "class": chosen, "thumbs": thumbs}
    return JSONResponse(out)


def test_set_image(request: Request) -> Response:
    """One test image's thumbnail and true class (``index``), for the map's tooltip."""
    s = _served(request)
    index = _number(request, "index")
    _, labels = s.test_set()
    if index is None or index >= len(labels):
        raise UserError(f"index must be a test image, 0 … {len(labels) - 1}")
    return JSONResponse({"index": index, **s.test_thumbnails([index])[0]})


def bad_labels(request: Request) -> Response:
    """The training images whose label is likely wrong, the first :data:`BROWSE` with thumbnails."""
    s = _served(request)
    status = s.bad_labels()
    answer = status.to_json()
    if status.result is not None:
        r = status.result
        answer["result"] = {**{k: v for k, v in r.items() if k not in ("issues", "confident_joint")},
                            "issues": s.training_thumbnails(r["issues"][:BROWSE])}
    return JSONResponse(answer)


# --- errors ------------------------------------------------------------------------------------------------


async def not_found(request: Request, exc: Exception) -> Response:
    return error(404, "not found")


async def unknown(request: Request, exc: Exception) -> Response:
    return error(404, FORGOTTEN)


async def mistake(request: Request, exc: Exception) -> Response:
    return error(400, str(exc))


async def busy(request: Request, exc: Exception) -> Response:
    return error(429, str(exc))


ROUTES = [
    Route("/", home),
    Route("/run/{rid}", page),
    Route("/run/{rid}/units/{layer}", unit_index),
    Route("/run/{rid}/unit/{layer}/{channel}", unit),
    Route("/static/{name}", asset),
    Route("/api/{rid}/upload", upload, methods=["POST"]),
    Route("/api/{rid}/predict", predict),
    Route("/api/{rid}/explain", explain),
    Route("/api/{rid}/features", features),
    Route("/api/{rid}/channel", channel),
    Route("/api/{rid}/trust", trust),
    Route("/api/{rid}/curves", curves),
    Route("/api/{rid}/confusion", run_confusion),
    Route("/api/{rid}/images", browse),
    Route("/api/{rid}/embedding", embedding),
    Route("/api/{rid}/mistakes", mistakes),
    Route("/api/{rid}/test-image", test_set_image),
    Route("/api/{rid}/labels", bad_labels),
]
EXCEPTION_HANDLERS = {404: not_found, LookupError: unknown, UserError: mistake, Busy: busy}


def create_app(runs: list[Served], hosts: Iterable[str] = LOOPBACK, port: int | None = None) -> Starlette:
    """The ASGI application serving ``runs`` (already loaded), answering requests addressed to ``hosts``
    (see :func:`cnnlab.serve.middleware.allowed_hosts`) on ``port`` (None: any)."""
    middleware = [Middleware(SecurityHeaders), Middleware(SameOrigin, hosts=hosts, port=port),
                  Middleware(ServerErrors)]
    app = Starlette(routes=ROUTES, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.state.runs = runs
    app.state.images = runs[0].images
    app.state.jobs = runs[0].jobs
    app.state.static = {name: resources.files("cnnlab.serve").joinpath("static", name).read_bytes()
                        for name in ("app.js", "labels.js", "app.css")} | units.STATIC
    return app
