"""The cheap pass over a layout's image headers, and the decoding plan it settles.

The headers give the channel count and the sizes; from them and the run's sizing follows what every
image becomes (:class:`DecodePlan`), before any pixel is decoded. The summary of that pass is kept
beside the cache entries (``KEY.probe.json``, with its checksum), so that a second run with another
size plans without reading the headers again. A summary that is damaged or edited is not trusted:
the headers are read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.core import images
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.data.readers import pool
from cnnlab.data.readers.layout import Layout, Source, check_not_emptied, encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizing:
    store_size: int | None  # every image at this square size
    image_size: int | None  # the network's input: images larger than it are stored at it


@dataclass(frozen=True)
class DecodePlan:
    """What every image becomes: its channel count and size, and whether it must be resized."""

    channels: int
    height: int
    width: int
    fit: bool

    @property
    def tag(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}{'-fit' if self.fit else ''}"


def plan(summary: dict[str, Any], sizing: Sizing) -> DecodePlan:
    """The plan for a probed layout (its ``summary``) at the run's ``sizing``."""
    channels, uniform = int(summary["channels"]), summary["uniform"]
    if sizing.store_size is not None:
        side = sizing.store_size
        return DecodePlan(channels, side, side, fit=uniform != [side, side])
    if uniform is not None and (sizing.image_size is None or max(uniform) <= sizing.image_size):
        width, height = uniform
        return DecodePlan(channels, height, width, fit=False)
    side = int(summary["median_short"]) if uniform is None else min(uniform)
    if sizing.image_size is not None:
        side = min(side, sizing.image_size)
    return DecodePlan(channels, side, side, fit=True)


def _probe(rel: str, data: Source, source: str) -> tuple[str, int, int]:
    """Mode, width and height from the image header, without decoding pixels."""
    data = encoded(data)
    try:
        return images.header(data)
    except images.DECODE_ERRORS as exc:
        raise UserError(f"{source}: cannot read image {rel} ({exc}); remove or replace the file, "
                        "or pass `skip_bad_images` to leave such files out") from None


def _probe_chunk(items: list[tuple[str, Source]], source: str, skip_bad: bool) -> list[tuple[str, int, int] | None]:
    """Headers of a chunk; with ``skip_bad`` an unreadable image gives None instead of stopping."""
    headers: list[tuple[str, int, int] | None] = []
    for rel, data in items:
        try:
            headers.append(_probe(rel, data, source))
        except UserError:
            if not skip_bad:
                raise
            headers.append(None)
    return headers


def probe_layout(layout: Layout, source: Path, skip_bad: bool) -> dict[str, Any]:
    """The cheap pass: headers only, to settle channels and size before any pixel is decoded.

    Leaves the unreadable images (``skip_bad``) out of ``layout``; returns it with their names and
    the summary that :func:`plan` takes."""
    skipped: list[str] = []
    modes, sizes = set(), []
    everything = [(rel, data) for split in ("train", "test") for rel, data, _ in layout.items[split]]
    with pool.executor(len(everything), 0) as (workers, window):
        chunks = layout.chunks(everything, pool.POOL_CHUNK)
        headers = [h for chunk in pool.map_chunks(_probe_chunk, chunks, workers, window, str(source), skip_bad)
                   for h in chunk]
    start = 0
    for split in ("train", "test"):
        items = layout.items[split]
        kept = []
        for item, header in zip(items, headers[start:start + len(items)]):
            if header is None:
                skipped.append(item[0])
                continue
            kept.append(item)
            modes.add(header[0])
            sizes.append(header[1:])
        start += len(items)
        layout.items[split] = kept
    check_not_emptied(layout, source)
    channels = 1 if modes <= images.GRAY_MODES else 3
    uniform = list(sizes[0]) if len(set(sizes)) == 1 else None
    median_short = statistics.median_low(min(w, h) for w, h in sizes)
    return {"layout": layout, "skipped": skipped,
            "summary": {"channels": channels, "uniform": uniform, "median_short": median_short}}


# --- the summary kept in the cache ---------------------------------------------------------------


def _checksum(summary: Any) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def _side(value: Any) -> bool:
    return type(value) is int and value > 0


def _invalid(summary: Any) -> str | None:
    """What is wrong with a summary's values, or None when :func:`plan` can use them."""
    if not isinstance(summary, dict) or summary.get("channels") not in (1, 3):
        return "its channel count is neither 1 nor 3"
    uniform = summary.get("uniform")
    if uniform is not None and not (isinstance(uniform, list) and len(uniform) == 2 and all(map(_side, uniform))):
        return "its common size is not two positive whole numbers"
    if not _side(summary.get("median_short")):
        return "its median side is not a positive whole number"
    return None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Keep ``summary`` at ``path`` with its checksum; a cache that cannot take it only costs a header pass."""
    try:
        atomic_write(path, json.dumps({"summary": summary, "sha256": _checksum(summary)}))
    except OSError:
        pass  # the entry itself says what is wrong with the cache


def read_summary(path: Path) -> dict[str, Any] | None:
    """The summary kept at ``path``; None when there is none to trust (missing, from an earlier version
    without a checksum, damaged or edited), after one note for the last two."""
    try:
        saved = json.loads(path.read_text())
    except OSError:
        return None
    except ValueError:
        saved = {"sha256": "", "summary": None}  # damaged: not even JSON
    if not isinstance(saved, dict) or "sha256" not in saved:
        return None
    summary = saved.get("summary")
    problem = "it does not match its checksum" if saved["sha256"] != _checksum(summary) else _invalid(summary)
    if problem is not None:
        log.warning(f"the cached image summary {path} is damaged ({problem}); reading the image headers again")
        return None
    return summary
