"""A ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` of the folder layout, read through :mod:`cnnlab.data.archives`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from cnnlab.data.archives import read_archive
from cnnlab.data.readers.fingerprint import hash_file
from cnnlab.data.readers.layout import Layout
from cnnlab.data.readers.reader import ImageReader
from cnnlab.data.readers.tree import Tree, image_extensions, is_candidate, tree_layout
from cnnlab.data.scratch import scratch_folder

# ``--dataset sample``: 500 training and 100 test images per class of CIFAR-10 (scripts/make_sample.py).
SAMPLE_ARCHIVE = Path(__file__).parents[1] / "sample" / "cifar10-sample.tar.gz"


class ArchiveReader(ImageReader):
    """An archive's images, keyed by the archive's bytes; they are unpacked (and checked) only when the
    cache has no entry for them, into a scratch folder that ``scratch`` removes once they are decoded."""

    def content(self) -> str:
        return hash_file(self.path)

    def layout(self, scratch: ExitStack) -> Layout:
        extensions = image_extensions()
        folder = scratch.enter_context(scratch_folder())
        contents = read_archive(self.path, folder, keep=lambda rel: is_candidate(rel, extensions))
        return tree_layout(Tree(dict(contents.files), set(contents.dirs)), self.path)
