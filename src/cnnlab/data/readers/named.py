"""The named datasets (``cifar10``, ``mnist``, …) of :mod:`cnnlab.data.standard`, from their official files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cnnlab.data.readers.fingerprint import cache_key, hash_arrays, hash_files
from cnnlab.data.readers.probe import Sizing
from cnnlab.data.readers.reader import Reader
from cnnlab.data.standard import NAMED, Arrays, checked
from cnnlab.data.store import Entry, EntryBuilder, cached

NAMED_CHUNK = 10_000  # images per write when a named dataset goes into the cache


def default_data_dir() -> Path:
    """Where named datasets are looked for (and downloaded): $CNNLAB_DATA or ~/.cache/cnnlab/data."""
    env = os.environ.get("CNNLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnlab" / "data"


def _write_arrays(builder: EntryBuilder, arrays: Arrays) -> None:
    builder.reserve(sum(x.nbytes for x, _ in (arrays.train, arrays.test)))
    for split, (x, y) in (("train", arrays.train), ("test", arrays.test)):
        writer = builder.split(split, x.shape[1:])
        for start in range(0, len(x), NAMED_CHUNK):
            writer.append(x[start:start + NAMED_CHUNK], y[start:start + NAMED_CHUNK])


class NamedReader(Reader):
    """A named dataset in ``data_dir`` (fetched there first with ``download``), keyed by its files;
    its fingerprint is that of its pixels and labels, whatever files hold them."""

    def __init__(self, name: str, data_dir: Path, download: bool) -> None:
        self.name, self.data_dir, self.download = name, data_dir, download
        self.named = NAMED[name]

    def content(self) -> str:
        files = self.named.find(self.data_dir)
        if files is None and self.download:
            self.named.fetch(self.data_dir)
            files = self.named.find(self.data_dir)
        if files is None:
            raise self.named.missing(self.data_dir)
        return hash_files(files, self.name)

    def entry(self, content: str, skip_bad: bool, sizing: Sizing) -> Entry:
        named, data_dir = self.named, self.data_dir

        def build(builder: EntryBuilder) -> dict[str, Any]:
            arrays = checked(named.read(data_dir), named.title, named.where(data_dir))
            _write_arrays(builder, arrays)
            return {"classes": arrays.classes, "source": self.name, "fingerprint": hash_arrays(arrays)}

        return cached(f"{self.name}-{cache_key(content)}", build)
