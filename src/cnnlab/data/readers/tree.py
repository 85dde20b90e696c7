"""A ``train/<class>/…``, ``test/<class>/…`` tree of images, from a folder or an archive, as a layout."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from cnnlab.core.errors import UserError
from cnnlab.data.readers.layout import Layout, Source

LAYOUT_HINT = "expected train/<class>/<images> and test/<class>/<images>"


class Tree:
    """Files (their bytes, or the path to read them from) and folders, by relative POSIX path."""

    def __init__(self, files: dict[str, Source], dirs: set[str]) -> None:
        self.files, self.dirs = files, dirs


def image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def is_hidden(part: str) -> bool:
    # macOS zips carry a __MACOSX/ tree of resource forks next to the real files.
    return part.startswith(".") or part == "__MACOSX"


def is_candidate(relpath: str, extensions: frozenset[str]) -> bool:
    """Whether a file is an image we should decode: a PIL extension and no hidden path part."""
    parts = relpath.split("/")
    return not any(is_hidden(p) for p in parts) and os.path.splitext(parts[-1])[1].lower() in extensions


def _strip_single_top(tree: Tree) -> Tree:
    """Accept ``top/train/...`` as if it were ``train/...`` when one folder holds everything."""
    tops = {rel.split("/", 1)[0] for rel in tree.files}
    if len(tops) != 1 or tops & {"train", "test"} or not all("/" in rel for rel in tree.files):
        return tree
    prefix = tops.pop() + "/"
    return Tree({rel[len(prefix):]: data for rel, data in tree.files.items()},
                {d[len(prefix):] for d in tree.dirs if d.startswith(prefix)})


def _class_folders(tree: Tree, source: Path) -> dict[str, dict[str, list[str]]]:
    """Per split, the images of each class folder (an empty list for a folder without images)."""
    per_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for d in tree.dirs:
        parts = d.split("/")
        if len(parts) >= 2 and parts[0] in per_split and not is_hidden(parts[1]):
            per_split[parts[0]].setdefault(parts[1], [])
    for rel in sorted(tree.files):
        parts = rel.split("/")
        if parts[0] not in per_split:
            continue  # images outside train/ and test/ are not part of the layout
        if len(parts) == 2:
            raise UserError(f"{source}: {rel} is not inside a class folder; {LAYOUT_HINT}")
        per_split[parts[0]].setdefault(parts[1], []).append(rel)
    return per_split


def tree_layout(tree: Tree, source: Path) -> Layout:
    """Class names (sorted train folders) and, per split, the images in path order."""
    tree = _strip_single_top(tree)
    per_split = _class_folders(tree, source)
    for split, folders in per_split.items():
        if not any(folders.values()):
            raise UserError(f"{source}: the {split} split has no images; {LAYOUT_HINT}")
        for cls, files in sorted(folders.items()):
            if not files:
                raise UserError(f"{source}: class folder {split}/{cls} has no images; add some or remove the folder")
    classes = sorted(per_split["train"])
    extra = sorted(set(per_split["test"]) - set(classes))
    if extra:
        raise UserError(f"{source}: test classes {', '.join(extra)} have no train/ folder; "
                        "add them to train/ or remove them from test/")
    index = {cls: i for i, cls in enumerate(classes)}
    items = {split: [(rel, tree.files[rel], index[cls])
                     for rel, cls in sorted((rel, cls) for cls, files in folders.items() for rel in files)]
             for split, folders in per_split.items()}
    return Layout(classes, items)
