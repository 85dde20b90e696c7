"""The explorer's unit pages, at stable URLs: ``/run/{i}/units/{layer}`` (every unit of a layer) and
``/run/{i}/unit/{layer}/{channel}`` (one unit's page).

They are the pages ``cnnlab visualize dossier`` writes, rendered by the same functions
(:mod:`cnnlab.report.dossier`) from the same result, which a background task computes once per layer
(:meth:`cnnlab.serve.runs.Served.units`) and caches. Until it is done a page says how far it is and
reloads itself (a ``<meta>`` refresh: the explorer allows no inline script), which is also what keeps
the task asked for.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import HTMLResponse, Response

from cnnlab.report.dossier import UNITS_CSS, UNITS_JS, Assets, index_page, unit_page
from cnnlab.report.page import CSS, document_end, document_head, e
from cnnlab.serve.jobs import Status
from cnnlab.serve.middleware import error
from cnnlab.serve.runs import Served

__all__ = ["STATIC", "index", "page"]

STATIC = {"units.css": (CSS + UNITS_CSS).encode(), "units.js": UNITS_JS.encode()}
STYLE = '<link rel="stylesheet" href="/static/units.css">'
REFRESH = 2  # seconds between a waiting page's reloads


def _assets(rid: int, layer: str) -> Assets:
    return Assets(STYLE, '<script src="/static/units.js"></script>', None,
                  lambda channel: f"/run/{rid}/unit/{layer}/{channel}", f"/run/{rid}/units/{layer}")


def _waiting(s: Served, layer: str, status: Status) -> Response:
    """A page that says how far the unit pages of ``layer`` are, and reloads itself until they are done."""
    if status.state == "failed":
        return error(400, f"the unit pages of {layer} could not be computed: {status.error}")
    ahead = f", {status.ahead} task{'s' if status.ahead != 1 else ''} before it" if status.state == "queued" else ""
    head = f'{STYLE}\n<meta http-equiv="refresh" content="{REFRESH}">'
    return HTMLResponse(document_head(f"cnnlab units: {layer} of {s.name}", head) + f"""<body>
<h1>Units of {e(layer)} <span class="sub">({e(s.name)})</span></h1>
<p id="waiting">Computing every unit of {e(layer)} (one pass over the test set, then the activation maximisation):
{e(status.state)}{ahead}, <progress max="1" value="{status.progress:.3f}"></progress> {100 * status.progress:.0f}%.
This page reloads itself until they are ready.</p>
""" + document_end())


def _status(s: Served, layer: str) -> Status:
    s.channels_of(layer)  # an unknown layer, or one without feature maps, is a UserError: 400
    return s.units(layer)


def index(s: Served, layer: str) -> Response:
    """Every unit of ``layer``, sortable, each linking to its page."""
    status = _status(s, layer)
    if status.result is None:
        return _waiting(s, layer, status)
    return HTMLResponse(index_page(status.result, _assets(s.index, layer)))


def page(s: Served, layer: str, channel: int | None) -> Response:
    """The page of unit ``channel`` of ``layer`` (None: a channel that is no whole number)."""
    status = _status(s, layer)
    if status.result is None:
        return _waiting(s, layer, status)
    data: dict[str, Any] = status.result
    positions = {u["channel"]: k for k, u in enumerate(data["units"])}
    if channel not in positions:
        return error(404, f"{layer} has {data['count']} channels (0 … {data['count'] - 1}); no such unit")
    return HTMLResponse(unit_page(data, positions[channel], _assets(s.index, layer)))
