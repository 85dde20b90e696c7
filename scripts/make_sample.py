"""Build the bundled CIFAR-10 sample from the full CIFAR-10 JPEG archive, reproducibly.

    python scripts/make_sample.py cifar10-jpeg.tar.gz [--out PATH]

Takes the first 500 files (by name) of each class from train/ and the first 100 from test/,
copies their JPEG bytes unchanged, and writes a tar.gz whose bytes depend only on the input:
members sorted, fixed owner/mode/mtime, gzip header without name or time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

from cnnlab.data.archives import Member, read_archive
from cnnlab.data.scratch import scratch_folder

PER_CLASS = {"train": 500, "test": 100}
MAX_BYTES = 3 * 2**20
MTIME = 1577836800  # 2020-01-01, the date the source archive carries
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "cnnlab" / "data" / "sample" / "cifar10-sample.tar.gz"


def select(files: dict[str, Member]) -> dict[str, Member]:
    """The first PER_CLASS[split] files of every ``split/class/`` folder, by sorted name."""
    chosen: dict[str, Member] = {}
    taken: dict[tuple[str, str], int] = {}
    for rel in sorted(files):
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in PER_CLASS:
            continue
        key = (parts[0], parts[1])
        if taken.get(key, 0) < PER_CLASS[parts[0]]:
            taken[key] = taken.get(key, 0) + 1
            chosen[rel] = files[rel]
    return chosen


def deterministic_tar_gz(files: dict[str, bytes]) -> bytes:
    """A tar.gz of ``files`` whose bytes are a function of the names and contents alone."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rel in sorted(files):
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = len(files[rel]), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[rel]))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="the full CIFAR-10 JPEG archive (train/<class>/*.jpg, test/<class>/*.jpg)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the sample (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    with scratch_folder() as folder:
        unpacked = read_archive(args.source, folder, keep=lambda rel: rel.lower().endswith(".jpg")).files
        chosen = {rel: member.read() for rel, member in select(unpacked).items()}
    data = deterministic_tar_gz(chosen)
    if len(data) > MAX_BYTES:
        print(f"sample would be {len(data):,} bytes, over the {MAX_BYTES:,} byte limit", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(chosen)} images, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
