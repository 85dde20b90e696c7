"""Images of a layout decoded into a cache entry: probed, planned, then decoded a chunk at a time.

Decoding is the slow part and happens once per content and plan: in parallel where the set is
big (:mod:`~cnnlab.data.readers.pool`), streamed into the cache a chunk at a time, so that memory
holds a few chunks whatever the size of the dataset.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cnnlab.core import images
from cnnlab.core.errors import UserError
from cnnlab.data.readers import pool
from cnnlab.data.readers.fingerprint import cache_key
from cnnlab.data.readers.layout import Layout, Source, check_not_emptied, encoded
from cnnlab.data.readers.probe import DecodePlan, Sizing, plan, probe_layout, read_summary, write_summary
from cnnlab.data.store import Entry, EntryBuilder, cached, entries_dir


def cached_images(layout: Callable[[], Layout], content: str, source: Path, skip_bad: bool,
                  sizing: Sizing) -> Entry:
    """The cache entry of a source of image files whose content hash is ``content``; ``layout`` is
    called only when its headers must be read or its images decoded."""
    base = cache_key(content) + ("-skip-bad" if skip_bad else "")
    prepared: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        if not prepared:
            prepared.update(probe_layout(layout(), source, skip_bad))
        return prepared

    summary_path = entries_dir() / f"{base}.probe.json"
    summary = read_summary(summary_path)
    if summary is None:
        summary = prepare()["summary"]
        write_summary(summary_path, summary)
    decoding = plan(summary, sizing)

    def build(builder: EntryBuilder) -> dict[str, Any]:
        state = prepare()
        return decode_into(builder, state["layout"], decoding, source, skip_bad, state["skipped"])

    return cached(f"{base}-{decoding.tag}", build)


def _decode_chunk(items: list[tuple[str, Source]], plan: DecodePlan, source: str,
                  skip_bad: bool) -> tuple[np.ndarray, list[int]]:
    """Decode a list of (path, bytes or file) into one (n, C, H, W) array; runs in worker processes too.

    Also returns the indices of images that failed (only with ``skip_bad``; else the first stops it).
    """
    out = np.empty((len(items), plan.channels, plan.height, plan.width), dtype=np.uint8)
    failed = []
    for i, (rel, data) in enumerate(items):
        data = encoded(data)
        try:
            out[i] = images.decode(data, plan.channels, fit=(plan.width, plan.height) if plan.fit else None)
        except images.DECODE_ERRORS as exc:
            if not skip_bad:
                raise UserError(f"{source}: cannot decode image {rel} ({exc}); remove or replace the file, "
                                "or pass `skip_bad_images` to leave such files out") from None
            failed.append(i)
    return out, failed


def decode_into(builder: EntryBuilder, layout: Layout, plan: DecodePlan, source: Path, skip_bad: bool,
                skipped: list[str]) -> dict[str, Any]:
    """Decode both splits into the entry a chunk at a time; images that fail (``skip_bad``) are left out."""
    row_bytes = plan.channels * plan.height * plan.width
    total = sum(len(items) for items in layout.items.values())
    builder.reserve(total * row_bytes)
    per_chunk = max(1, min(pool.POOL_CHUNK, pool.CHUNK_BYTES // row_bytes))
    skipped = list(skipped)
    with pool.executor(total, total * row_bytes) as (workers, window), pool.one_torch_thread(), \
            tqdm(total=total, desc=f"decoding {source.name}", unit="img", file=sys.stderr, leave=False,
                 disable=not sys.stderr.isatty()) as bar:
        for split in ("train", "test"):
            items = layout.items[split]
            writer = builder.split(split, (plan.channels, plan.height, plan.width))
            chunks = [items[i:i + per_chunk] for i in range(0, len(items), per_chunk)]
            work = (layout.ready([(rel, data) for rel, data, _ in chunk]) for chunk in chunks)
            kept = []
            for chunk, (decoded, bad) in zip(chunks, pool.map_chunks(_decode_chunk, work, workers, window, plan,
                                                                      str(source), skip_bad)):
                keep = [i for i in range(len(chunk)) if i not in set(bad)]
                writer.append(decoded[keep] if bad else decoded, [chunk[i][2] for i in keep])
                skipped += [chunk[i][0] for i in bad]
                kept += [chunk[i] for i in keep]
                bar.update(len(chunk))
            layout.items[split] = kept
    # Images whose header read fine but whose pixels did not (e.g. truncated files) may empty a class.
    check_not_emptied(layout, source)
    return {"classes": layout.classes, "skipped": skipped, "source": str(source)}
