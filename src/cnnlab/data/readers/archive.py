"""A ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` of the folder layout, read through :mod:`cnnlab.data.archives`."""

from __future__ import annotations

from pathlib import Path

from cnnlab.data.archives import read_archive
from cnnlab.data.readers.fingerprint import hash_file
from cnnlab.data.readers.layout import Layout
from cnnlab.data.readers.reader import ImageReader
from cnnlab.data.readers.tree import Tree, image_extensions, is_candidate, tree_layout

# ``--dataset sample``: 500 training and 100 test images per class of CIFAR-10 (scripts/make_sample.py).
SAMPLE_ARCHIVE = Path(__file__).parents[1] / "sample" / "cifar10-sample.tar.gz"


class ArchiveReader(ImageReader):
    """An archive's images, keyed by the archive's bytes; they are read into memory (and checked) only
    when the cache has no entry for them."""

    def content(self) -> str:
        return hash_file(self.path)

    def layout(self) -> Layout:
        extensions = image_extensions()
        contents = read_archive(self.path, keep=lambda rel: is_candidate(rel, extensions))
        return tree_layout(Tree(dict(contents.files), set(contents.dirs)), self.path)
