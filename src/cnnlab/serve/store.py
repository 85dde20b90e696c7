"""Uploaded images, decoded, kept in memory by id: the few most recent only.

An upload is read into memory (never written to disk), decoded by the one image decoder once per
served run (each run reads images at its own size and channel count, as ``cnnlab predict`` would),
and its bytes dropped. The store keeps at most :data:`KEPT` images, so memory does not grow with
the number of uploads; a page whose image was evicted is told to upload it again.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Image", "ImageStore"]

KEPT = 32


@dataclass
class Image:
    name: str  # what the page calls it: the uploaded file's name, or "test image N"
    pixels: dict[int, Tensor]  # served run index → uint8 (C, H, W) as that run reads the image
    label: str | None = None  # the true class, for a test image of the run


class ImageStore:
    """A least-recently-used map from random ids to uploaded images."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._images: OrderedDict[str, Image] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, image: Image) -> str:
        ref = "u-" + secrets.token_hex(8)  # not guessable: one page cannot read another's uploads by id
        with self._lock:
            self._images[ref] = image
            while len(self._images) > self._kept:
                self._images.popitem(last=False)
        return ref

    def get(self, ref: str) -> Image | None:
        with self._lock:
            image = self._images.get(ref)
            if image is not None:
                self._images.move_to_end(ref)
            return image

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)
