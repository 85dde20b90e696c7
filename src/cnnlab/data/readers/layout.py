"""What a reader hands the decoder: the class names and, per split, the images with their labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.core.errors import UserError
from cnnlab.data.archives import Member

Source = bytes | Path | Member  # an image's encoded bytes, the file holding them, or where an archive's is unpacked


def encoded(data: Source) -> bytes | Path:
    """What the decoder takes: an archive member is read here, in the process that decodes it."""
    return data.read() if isinstance(data, Member) else data


@dataclass
class Layout:
    """Class names and, per split, (name for messages, image, label) in a fixed order.

    ``resolve`` turns a chunk's images into bytes or files where the layout holds references
    (rows of a Hugging Face dataset), a chunk at a time, before the chunk is handed to a worker.
    """

    classes: list[str]
    items: dict[str, list[tuple[str, Any, int]]]
    resolve: Callable[[list[tuple[str, Any]]], list[tuple[str, Source]]] | None = None

    def ready(self, chunk: list[tuple[str, Any]]) -> list[tuple[str, Source]]:
        return self.resolve(chunk) if self.resolve is not None else chunk

    def chunks(self, items: list[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Source]]]:
        return (self.ready(items[start:start + size]) for start in range(0, len(items), size))


def check_not_emptied(layout: Layout, source: Path) -> None:
    """After leaving bad images out, every train class and the test split must still have images."""
    present = {label for _, _, label in layout.items["train"]}
    emptied = [c for i, c in enumerate(layout.classes) if i not in present]
    if emptied:
        raise UserError(f"{source}: no readable training images are left in class {', '.join(emptied)}; "
                        "replace the unreadable files")
    if not layout.items["test"]:
        raise UserError(f"{source}: no readable test images are left; replace the unreadable files")
