"""What every reader offers (one reader per kind of source, as timm's ``data/readers`` has them)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import ExitStack
from pathlib import Path

from cnnlab.data.readers.decoding import cached_images
from cnnlab.data.readers.layout import Layout
from cnnlab.data.readers.probe import Sizing
from cnnlab.data.store import Entry


class Reader(ABC):
    """A source of labelled images: its content hash, then its entry in the pixel cache."""

    @abstractmethod
    def content(self) -> str:
        """The content hash: the run's data fingerprint, and with the decoder's version the cache key."""

    @abstractmethod
    def entry(self, content: str, skip_bad: bool, sizing: Sizing) -> Entry:
        """The cache entry for ``content`` (what :meth:`content` returned), built first when missing.

        An image that cannot be decoded stops the build with its name, unless ``skip_bad``; ``sizing``
        sets the stored size of images that are files."""


class ImageReader(Reader):
    """A source of encoded images (a folder, an archive, a CSV list, a saved Hugging Face dataset)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def layout(self, scratch: ExitStack) -> Layout:
        """The classes and each split's images: asked for only when the images must be read.

        What the images need until they are decoded (an archive's members unpacked to disk) is entered
        into ``scratch``, which :meth:`entry` closes once the cache entry is built, or has failed."""

    def entry(self, content: str, skip_bad: bool, sizing: Sizing) -> Entry:
        with ExitStack() as scratch:
            return cached_images(lambda: self.layout(scratch), content, self.path, skip_bad, sizing)
