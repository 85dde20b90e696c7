"""A CSV list of image paths and labels: ``folder:list.csv``, or ``folder:DIR`` with train.csv and test.csv.

A list is trusted as a script is: its paths, relative to the CSV's folder, may name any image file
the user can read (``..``, absolute paths), as with torchvision's and pandas-based CSV datasets.
Each row's file is checked before anything reads it, and a row naming a missing file, a folder or a
device is refused naming the row.
"""

from __future__ import annotations

import csv
import io
from contextlib import ExitStack
from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.data.archives import member_limit
from cnnlab.data.readers.files import check_image_file, open_regular
from cnnlab.data.readers.fingerprint import hash_files
from cnnlab.data.readers.layout import Layout
from cnnlab.data.readers.reader import ImageReader

CSV_HINT = "a CSV needs a header row with path and label columns, and a split column (train or test) " \
           "unless it is train.csv or test.csv beside the other"

Row = tuple[str, Path, str, str]  # name for messages, image path, label, split


def csv_files(path: Path) -> list[tuple[Path, str | None]] | None:
    """The CSV lists a ``folder:`` path names: one CSV with a split column, or train.csv and test.csv."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return [(path, None)]
    if path.is_dir() and not (path / "train").is_dir() and (path / "train.csv").is_file():
        return [(path / "train.csv", "train"), (path / "test.csv", "test")]
    return None


def _read_text(path: Path) -> str:
    try:
        with open_regular(path) as f:
            return f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {CSV_HINT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); it must be a UTF-8 CSV file") from None


def _csv_rows(path: Path, fixed_split: str | None, limit: int) -> list[Row]:
    """The rows of one CSV file, each image file checked (:func:`~cnnlab.data.readers.files.check_image_file`)."""
    reader = csv.reader(io.StringIO(_read_text(path)))
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header or (fixed_split is None and "split" not in header):
        raise UserError(f"{path}: header {','.join(header) or '(none)'}: {CSV_HINT}")
    columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    rows = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path}, line {line}: {len(row)} values for {len(header)} columns")
        split = fixed_split or row[columns["split"]].strip().lower()
        if split not in ("train", "test"):
            raise UserError(f"{path}, line {line}: split {row[columns['split']]!r} is neither train nor test")
        rel, label = row[columns["path"]].strip(), row[columns["label"]].strip()
        if not rel or not label:
            raise UserError(f"{path}, line {line}: an empty path or label")
        image = (path.parent / rel).expanduser()
        check_image_file(image, limit, f"{rel} (line {line} of {path})")
        rows.append((rel, image, label, split))
    return rows


def _csv_layout(rows: list[Row], source: Path) -> Layout:
    classes = sorted({label for _, _, label, split in rows if split == "train"})
    for split in ("train", "test"):
        if not any(s == split for *_, s in rows):
            raise UserError(f"{source}: the {split} split has no rows; {CSV_HINT}")
    extra = sorted({label for _, _, label, split in rows if split == "test"} - set(classes))
    if extra:
        raise UserError(f"{source}: test labels {', '.join(extra)} have no training images")
    index = {cls: i for i, cls in enumerate(classes)}
    return Layout(classes, {split: [(rel, path, index[label]) for rel, path, label, s in rows if s == split]
                            for split in ("train", "test")})


class CsvReader(ImageReader):
    """The images a CSV list (or a train.csv and test.csv pair) names, keyed by the lists and the images."""

    def __init__(self, path: Path, files: list[tuple[Path, str | None]]) -> None:
        super().__init__(path)
        self.files = files
        self._rows: list[Row] | None = None

    def _read(self) -> list[Row]:
        if self._rows is None:
            limit = member_limit()
            self._rows = [row for path, split in self.files for row in _csv_rows(path, split, limit)]
        return self._rows

    def content(self) -> str:
        rows = self._read()
        return hash_files([image for _, image, _, _ in rows], hash_files([p for p, _ in self.files], "csv"))

    def layout(self, scratch: ExitStack) -> Layout:
        return _csv_layout(self._read(), self.path)
