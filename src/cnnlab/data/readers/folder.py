"""A folder of ``train/<class>/…`` and ``test/<class>/…`` images, walked without reading an image."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.data.archives import member_limit
from cnnlab.data.readers.files import check_image_file
from cnnlab.data.readers.fingerprint import hash_tree
from cnnlab.data.readers.layout import Layout
from cnnlab.data.readers.reader import ImageReader
from cnnlab.data.readers.tree import Tree, image_extensions, is_candidate, is_hidden, tree_layout


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_links(root: Path, folder: str, subdirs: list[str], real: dict[str, str]) -> None:
    """Refuse a folder link among ``subdirs`` that would have a folder read again.

    ``real`` holds the real path of every folder walked so far. A link to a folder that contains
    it (on disk, or on the way the walk came) would be read forever; a link to a folder inside the
    dataset would have that folder's images read a second time, labelled by where the link is
    (and two such links between sibling folders form a loop)."""
    above, walked = set(), folder
    while walked in real:
        above.add(real[walked])
        parent = os.path.dirname(walked)
        if parent == walked:  # the file system's root
            break
        walked = parent
    here, top = real[folder], real[os.fspath(root)]
    for d in subdirs:
        link = Path(folder, d)
        if not link.is_symlink():
            continue
        target = os.path.realpath(link)
        if target in above or _inside(here, target):
            raise UserError(f"{link} is a link to a folder that contains it ({target}); "
                            "remove the link, it would be read forever")
        if _inside(target, top):
            raise UserError(f"{link} is a link to {target}, a folder inside the dataset itself: its images would "
                            f"be read again under another label; remove the link or point it outside {root}")


def list_directory(root: Path) -> Tree:
    """The images under ``root`` by path: nothing is read yet, so memory does not grow with the folder.

    Folders and files that are symbolic links are followed (datasets are often assembled from links)
    unless a link would have a folder read again (:func:`_check_links`). Each file is checked before
    anything reads it: a regular file (not a device or a FIFO), within the per-image size bound
    (:func:`~cnnlab.data.archives.member_limit`)."""
    extensions = image_extensions()
    tree = Tree({}, set())
    limit = member_limit()
    real: dict[str, str] = {}
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not is_hidden(d))
        real[folder] = os.path.realpath(folder)
        _check_links(root, folder, subdirs, real)
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        tree.dirs.update(prefix + d for d in subdirs)
        for name in files:
            rel = prefix + name
            if is_candidate(rel, extensions):
                path = Path(folder, name)
                check_image_file(path, limit)
                tree.files[rel] = path
    return tree


class FolderReader(ImageReader):
    """``folder:DIR`` with ``train/`` and ``test/`` class folders (or one folder above them)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tree: Tree | None = None

    def _listed(self) -> Tree:
        if self._tree is None:
            self._tree = list_directory(self.path)
        return self._tree

    def content(self) -> str:
        return hash_tree(self._listed())

    def layout(self, scratch: ExitStack) -> Layout:
        return tree_layout(self._listed(), self.path)
