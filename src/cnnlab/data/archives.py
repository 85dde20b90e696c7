"""Safe, in-memory reading of .tar, .tar.gz, .tgz and .zip archives.

Nothing is ever extracted to disk: members are read into memory, so a hostile archive cannot
write outside any folder. Members that would be dangerous if extracted (absolute paths, ``..``
components, links leaving the archive, device files) are still refused, because an archive that
holds them is either broken or an attack, and a user is better told than silently served half.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cnnlab.core.errors import UserError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_TOTAL_BYTES = 16 * 2**30  # uncompressed; far above any image set that fits in memory decoded
MAX_MEMBERS = 2_000_000

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class ArchiveContents:
    """Regular files kept by the caller's filter, and every folder the archive names or implies."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)


def is_archive(path: Path) -> bool:
    """Whether ``path`` has one of the archive suffixes this module reads."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def read_archive(path: Path, keep: Callable[[str], bool] = lambda name: True) -> ArchiveContents:
    """Check every member of the archive at ``path`` and read the regular files that ``keep`` accepts.

    Paths in the result are relative POSIX paths without a leading ``./``. Raises ``UserError``
    naming the member for anything unsafe, and for archives that are corrupt or too large.
    """
    name = path.name.lower()
    try:
        if name.endswith(".zip"):
            return _read_zip(path, keep)
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            return _read_tar(path, keep)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"cannot read archive {path}: {exc}; check that the file is complete and not corrupt") from None
    raise UserError(f"{path} is not a supported archive: use one of {', '.join(ARCHIVE_SUFFIXES)}")


def _clean_name(archive: Path, member: str) -> str:
    """The member's path relative to the archive root, or ``UserError`` if it could escape it."""
    unified = member.replace("\\", "/")
    if unified.startswith("/") or _WINDOWS_DRIVE.match(unified):
        raise UserError(f"archive {archive} has an absolute member path {member!r}; refusing to read it")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"archive {archive} has a member {member!r} that points outside it ('..'); refusing to read it")
    return "/".join(parts)


def _check_link(archive: Path, member: str, clean: str, target: str, hard: bool) -> None:
    """Refuse a link whose target leaves the archive root; links that stay inside are harmless."""
    unified = target.replace("\\", "/")
    if unified.startswith("/") or _WINDOWS_DRIVE.match(unified):
        escapes = True
    else:
        # Symlinks resolve from the link's own folder, hard links from the archive root.
        base = [] if hard else list(PurePosixPath(clean).parent.parts)
        depth = len(base)
        escapes = False
        for part in unified.split("/"):
            if part in ("", "."):
                continue
            depth += -1 if part == ".." else 1
            if depth < 0:
                escapes = True
                break
    if escapes:
        raise UserError(f"archive {archive} has a link {member!r} -> {target!r} that points outside it; refusing to read it")


def _add_parents(contents: ArchiveContents, clean: str) -> None:
    for parent in PurePosixPath(clean).parents:
        if str(parent) != ".":
            contents.dirs.add(str(parent))


class _Budget:
    """Counts members and uncompressed bytes so that bombs fail early with a clear message."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.total = archive, 0, 0

    def add(self, member: str, size: int) -> None:
        self.members += 1
        self.total += max(size, 0)
        if self.members > MAX_MEMBERS:
            raise UserError(f"archive {self.archive} has more than {MAX_MEMBERS:,} members (at {member!r}); use a smaller subset")
        if self.total > MAX_TOTAL_BYTES:
            raise UserError(
                f"archive {self.archive} unpacks to more than {MAX_TOTAL_BYTES / 2**30:.0f} GiB (at {member!r}); use a smaller subset"
            )


def _read_tar(path: Path, keep: Callable[[str], bool]) -> ArchiveContents:
    contents, budget = ArchiveContents(), _Budget(path)
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            clean = _clean_name(path, info.name)
            budget.add(info.name, info.size if info.isfile() else 0)
            if info.issym() or info.islnk():
                _check_link(path, info.name, clean, info.linkname, hard=info.islnk())
                continue
            if info.ischr() or info.isblk() or info.isfifo() or not (info.isfile() or info.isdir()):
                raise UserError(f"archive {path} has a special (device or fifo) member {info.name!r}; refusing to read it")
            if not clean:
                continue
            if info.isdir():
                contents.dirs.add(clean)
                _add_parents(contents, clean)
                continue
            _add_parents(contents, clean)
            if keep(clean):
                handle = tar.extractfile(info)
                assert handle is not None  # regular files always have data
                contents.files[clean] = handle.read()
    return contents


def _read_zip(path: Path, keep: Callable[[str], bool]) -> ArchiveContents:
    contents, budget = ArchiveContents(), _Budget(path)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            clean = _clean_name(path, info.filename)
            budget.add(info.filename, info.file_size)
            mode = info.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
            if stat.S_ISLNK(mode):
                _check_link(path, info.filename, clean, archive.read(info).decode("utf-8", "replace"), hard=False)
                continue
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UserError(f"archive {path} has a special (device or fifo) member {info.filename!r}; refusing to read it")
            if not clean:
                continue
            if info.is_dir():
                contents.dirs.add(clean)
                _add_parents(contents, clean)
                continue
            _add_parents(contents, clean)
            if keep(clean):
                if info.flag_bits & 0x1:
                    raise UserError(f"archive {path} member {info.filename!r} is encrypted; decrypt the archive first")
                # ZipExtFile stops at the declared size, so a lying header cannot inflate memory.
                contents.files[clean] = archive.read(info)
    return contents
