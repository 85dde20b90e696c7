"""Safe reading of .tar, .tar.gz, .tgz and .zip archives, a member at a time, into a folder of their own.

Each kept member is streamed, a block at a time, onto the end of one spool file in the caller's folder
(a private scratch folder, :mod:`cnnlab.data.scratch`) and handed on as a :class:`Member`, its place
in that file: memory holds a block, not the archive, and the member's own name never reaches the disk,
so a hostile archive cannot write outside the folder. One file rather than one per member, because
file systems make and delete small files slowly: CIFAR-10's 60,000 took minutes on a virtual disk
(a network home folder is no faster), the spool file seconds. Members that would
be dangerous if extracted (absolute paths, ``..`` components, links leaving the archive, device files)
are still refused, because an archive that holds them is either broken or an attack, and a user is
better told than silently served half.

Sizes are bounded before anything is unpacked, from the headers: each member by the largest file an
image PIL decodes can plausibly be and by the machine's memory (:func:`member_limit`), and the whole by
half the memory; a member, or the whole archive, that compresses better than any image set does (a zip
bomb) is refused by its ratio (a zip's from its central directory, before any member is inflated; a
tar's as its headers come); a tar's extended headers (long names, pax records) may not exceed
:data:`MAX_EXTENDED_HEADER`; and a member whose first bytes are an image header is read in full only
if its size fits the image that header describes. A tar must end with its end-of-archive blocks, so
that one cut short at a member boundary is not taken for a smaller data set.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from cnnlab.core import images
from cnnlab.core.errors import UserError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_TOTAL_BYTES = 16 * 2**30  # uncompressed; also never more than half the memory (total_limit)
MAX_MEMBERS = 2_000_000
BLOCK_BYTES = 2**20  # a member is unpacked this many bytes at a time
SPOOL_FILE = "members"  # in the caller's folder: every kept member, one after another
# PIL refuses to decode more than twice MAX_IMAGE_PIXELS pixels; no file of such an image, even
# uncompressed 8-bit RGBA, is larger than this. CNNLAB_MAX_IMAGE_BYTES overrides it (either way,
# at most an eighth of the memory: reading a member and decoding it each take as much again).
MAX_IMAGE_BYTES = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485) * 4
# Images are compressed already; a member that shrinks more than this is not one (deflate's limit is ~1030).
MAX_RATIO = 200
RATIO_FLOOR = 16 * 2**20  # smaller members may compress as well as they like: they cost little memory
HEADER_BYTES = 64 * 2**10  # read first, to learn what image (if any) a larger member claims to be
# A file of a w×h image is at most w·h·MAX_BYTES_PER_PIXEL bytes plus HEADER_SLACK of metadata and frames.
MAX_BYTES_PER_PIXEL = 16
HEADER_SLACK = 64 * 2**20
# tarfile reads a GNU long name or link ('L', 'K') or a pax header ('x', 'g', Solaris 'X') whole into memory.
# They carry a path (Linux's PATH_MAX is 4 KiB) and, from GNU tar --xattrs or macOS bsdtar, extended attributes
# (at most 64 KiB each on Linux): 1 MiB is far above any real one and costs nothing to read.
MAX_EXTENDED_HEADER = 2**20
EXTENDED_HEADERS = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                              tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Member:
    """An unpacked member: ``size`` bytes at ``offset`` in the spool file ``path``. Whoever decodes it reads
    it (a worker process), so that only this reference passes between processes."""

    path: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class ArchiveContents:
    """Regular files kept by the caller's filter (where each was unpacked to, by its name in the archive),
    and every folder the archive names or implies."""

    files: dict[str, Member] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)


def physical_memory() -> int:
    """Bytes of physical memory (16 GiB where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return 16 * 2**30


def member_limit() -> int:
    """The most bytes one image file (an archive member, a file in a folder) may have."""
    bound = MAX_IMAGE_BYTES
    env = os.environ.get("CNNLAB_MAX_IMAGE_BYTES", "").strip()
    if env:
        try:
            bound = int(env)
        except ValueError:
            raise UserError(f"CNNLAB_MAX_IMAGE_BYTES must be a whole number of bytes (got {env!r})") from None
    return min(bound, physical_memory() // 8)


def total_limit() -> int:
    """The most uncompressed bytes unpacked from one archive. They go to disk, not to memory, but the bound
    stays the memory's: an archive is unpacked again for every cache entry built from it (each image size),
    so a larger set is better extracted once and read as a folder."""
    return min(MAX_TOTAL_BYTES, physical_memory() // 2)


def is_archive(path: Path) -> bool:
    """Whether ``path`` has one of the archive suffixes this module reads."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def read_archive(path: Path, into: Path, keep: Callable[[str], bool] = lambda name: True) -> ArchiveContents:
    """Check every member of the archive at ``path`` and unpack the regular files that ``keep`` accepts
    into the folder ``into`` (which the caller makes private and removes).

    Names in the result are relative POSIX paths without a leading ``./``. Raises ``UserError``
    naming the member for anything unsafe, for archives that are corrupt or too large, and naming
    ``into`` when it cannot take a member (a full disk).
    """
    name = path.name.lower()
    if not name.endswith((".zip", ".tar", ".tar.gz", ".tgz")):
        raise UserError(f"{path} is not a supported archive: use one of {', '.join(ARCHIVE_SUFFIXES)}")
    try:
        with _Spool(path, into) as spool:
            return (_read_zip if name.endswith(".zip") else _read_tar)(path, spool, keep)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"cannot read archive {path}: {exc}; check that the file is complete and not corrupt") from None


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
        raise UserError(f"archive {archive} has a link {member!r} -> {target!r} that points outside it; "
                        "refusing to read it")


def _add_parents(contents: ArchiveContents, clean: str) -> None:
    for parent in PurePosixPath(clean).parents:
        if str(parent) != ".":
            contents.dirs.add(str(parent))


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,.0f} bytes"


class _Budget:
    """Counts members and uncompressed bytes so that bombs fail early, from the headers, with a clear message."""

    def __init__(self, archive: Path) -> None:
        self.archive, self.members, self.total = archive, 0, 0
        self.member_limit, self.total_limit = member_limit(), total_limit()
        self.archive_size = max(archive.stat().st_size, 1)

    def add(self, member: str, size: int, compressed: int | None = None) -> None:
        """Count a member of ``size`` bytes (``compressed`` on disk, for a zip) before any of it is read."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UserError(f"archive {self.archive} has more than {MAX_MEMBERS:,} members (at {member!r}); "
                            "use a smaller subset")
        if size > self.member_limit:
            raise UserError(
                f"archive {self.archive} member {member!r} unpacks to {_size(size)}, more than any image cnnlab "
                f"reads ({_size(self.member_limit)}: what the largest image PIL decodes can take, and at most an "
                f"eighth of this machine's memory; CNNLAB_MAX_IMAGE_BYTES raises it); refusing to read it")
        if compressed is not None and size > RATIO_FLOOR and size > MAX_RATIO * max(compressed, 1):
            raise UserError(
                f"archive {self.archive} member {member!r} unpacks from {_size(compressed)} to {_size(size)}, "
                f"{size // max(compressed, 1):,} times smaller packed than unpacked: no image compresses like that "
                f"(a zip bomb?); refusing to read it (if it is genuine, extract the archive and use the folder)")
        self.count(repr(member), size)

    def count(self, where: str, size: int) -> None:
        """Count ``size`` more unpacked bytes (a member's data, a tar's extended header) against the archive-wide
        bounds: the memory, and a ratio to the archive's size on disk that no image set reaches."""
        self.total += max(size, 0)
        if self.total > self.total_limit:
            raise UserError(
                f"archive {self.archive} unpacks to more than {_size(self.total_limit)} (at {where}), more than "
                f"{'half of this machine' if self.total_limit < MAX_TOTAL_BYTES else 'cnnlab'}'s memory allows; "
                "use a smaller subset")
        if self.total > RATIO_FLOOR and self.total > MAX_RATIO * self.archive_size:
            raise UserError(
                f"archive {self.archive} unpacks to more than {MAX_RATIO} times its size on disk (at {where}): no "
                "image set compresses like that (a bomb?); refusing to read it (if it is genuine, extract it and "
                "use the folder)")


def _check_head(archive: Path, member: str, head: bytes, size: int) -> None:
    """A member that starts with an image header is read in full only if its size fits the image the header
    describes (else it is a bomb dressed as an image)."""
    if len(head) >= size:
        return
    try:
        _, width, height = images.header(head)
    except Exception:  # noqa: BLE001 - hostile bytes; no header in the head: the size bounds above protect
        return
    plausible = width * height * MAX_BYTES_PER_PIXEL + HEADER_SLACK
    if size > plausible:
        raise UserError(f"archive {archive} member {member!r} is {_size(size)}, but its header describes a "
                        f"{width}×{height} image, whose file is never larger than {_size(plausible)}; "
                        "refusing to read it")


class _Spool:
    """Appends members to the spool file in ``folder``, each after the one before."""

    def __init__(self, archive: Path, folder: Path) -> None:
        self.archive, self.path, self.offset = archive, folder / SPOOL_FILE, 0

    @contextmanager
    def _disk(self) -> Iterator[None]:
        """Turn a failure to write into the folder (a full disk, a quota) into one line naming it; a failure
        to read the archive is left to :func:`read_archive`."""
        try:
            yield
        except OSError as e:
            raise UserError(f"cannot unpack archive {self.archive} into {self.path.parent}: {e.strerror or e}; "
                            "free some space on that disk or set CNNLAB_CACHE to a folder on another one") from None

    def __enter__(self) -> _Spool:
        with self._disk():
            self.file = open(self.path, "xb")
        return self

    def __exit__(self, *exc: object) -> None:
        with self._disk():
            self.file.close()

    def member(self, member: str, handle: BinaryIO, size: int) -> Member:
        """Stream a member of ``size`` declared bytes from ``handle`` into the spool file, its head checked first
        (:func:`_check_head`), then a block of at most :data:`BLOCK_BYTES` at a time, never more than ``size``."""
        head = handle.read(min(size, HEADER_BYTES))
        _check_head(self.archive, member, head, size)
        block, filled = head, 0
        while True:
            with self._disk():
                self.file.write(block)
            filled += len(block)
            if filled >= size:
                break
            block = handle.read(min(size - filled, BLOCK_BYTES))
            if not block:
                raise UserError(f"archive {self.archive} member {member!r} ends after {filled:,} of its "
                                f"{size:,} bytes; check that the file is complete and not corrupt")
        if handle.read(1):  # a zip's declared size is what its data inflates to, and the CRC is checked here
            raise UserError(f"archive {self.archive} member {member!r} holds more than the {size:,} bytes its "
                            "header declares; the archive is corrupt or forged")
        self.offset += size
        return Member(self.path, self.offset - size, size)


def _read_tar(path: Path, spool: _Spool, keep: Callable[[str], bool]) -> ArchiveContents:
    contents, budget = ArchiveContents(), _Budget(path)
    ending: dict[str, str] = {}
    with tarfile.open(path, "r:*", tarinfo=_end_aware(ending, budget)) as tar:
        for info in tar:
            clean = _clean_name(path, info.name)
            budget.add(info.name, info.size if info.isfile() else 0)
            if info.issym() or info.islnk():
                _check_link(path, info.name, clean, info.linkname, hard=info.islnk())
                continue
            if info.ischr() or info.isblk() or info.isfifo() or not (info.isfile() or info.isdir()):
                raise UserError(f"archive {path} has a special (device or fifo) member {info.name!r}; "
                                "refusing to read it")
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
                contents.files[clean] = spool.member(info.name, handle, info.size)
        if ending.get("how") != "marker":
            # tarfile takes the end of the data, or a damaged header, after a complete member for the end
            # of the archive: members would silently be missing.
            what = "is truncated" if ending.get("how") == "cut" else "has a damaged header"
            raise UserError(f"archive {path} {what}: it ends without the end-of-archive marker after {tar.offset:,} "
                            "bytes of members, so members are missing; copy or download it again")
    return contents


def _end_aware(ending: dict[str, str], budget: _Budget) -> type[tarfile.TarInfo]:
    """A TarInfo that records in ``ending["how"]`` how the member list ended: at the zero block that
    marks the end of a tar ("marker"), at the end of the data ("cut"), or at a damaged header ("damaged");
    and that refuses an extended header above MAX_EXTENDED_HEADER from its 512-byte block, before tarfile
    reads it whole, counting the others into ``budget``."""

    class EndAware(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            info = super().frombuf(buf, encoding, errors)
            if info.type in EXTENDED_HEADERS:
                if info.size > MAX_EXTENDED_HEADER:
                    raise UserError(
                        f"archive {budget.archive} has an extended header (a long name or pax record, type "
                        f"{info.type.decode('ascii', 'replace')!r}) of {_size(info.size)}, where real ones hold a "
                        f"path or a few attributes (cnnlab reads up to {_size(MAX_EXTENDED_HEADER)}); the archive "
                        "is corrupt or forged: refusing to read it")
                budget.count("an extended header", info.size)
            return info

        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.EOFHeaderError:
                ending["how"] = "marker"
                raise
            except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
                ending["how"] = "cut"
                raise
            except tarfile.HeaderError:
                ending["how"] = "damaged"
                raise

    return EndAware


def _read_zip(path: Path, spool: _Spool, keep: Callable[[str], bool]) -> ArchiveContents:
    contents, budget = ArchiveContents(), _Budget(path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:  # the central directory holds every size: a bomb is refused before a byte is inflated
            budget.add(info.filename, info.file_size, info.compress_size)
        for info in infos:
            clean = _clean_name(path, info.filename)
            mode = info.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
            if stat.S_ISLNK(mode):
                _check_link(path, info.filename, clean, archive.read(info).decode("utf-8", "replace"), hard=False)
                continue
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UserError(f"archive {path} has a special (device or fifo) member {info.filename!r}; "
                                "refusing to read it")
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
                # ZipExtFile stops at the declared size, so a lying header cannot unpack more.
                with archive.open(info) as handle:
                    contents.files[clean] = spool.member(info.filename, handle, info.file_size)
    return contents
