"""One reader per kind of source, and the factory that picks one for a ``dataset`` spec.

As in timm's ``data/readers``: :func:`create_reader` maps ``cifar10`` (and the other names of
:mod:`cnnlab.data.standard`), ``sample`` and ``folder:PATH`` to a :class:`~.reader.Reader`, whose
content hash is the run's data fingerprint and whose images end up in the pixel cache. A
``folder:PATH`` is a saved Hugging Face dataset (:mod:`.hf`), a CSV list (:mod:`.csv_list`), a
folder (:mod:`.folder`) or an archive (:mod:`.archive`), in that order of checks.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.core.errors import UserError
from cnnlab.data.archives import is_archive
from cnnlab.data.readers.archive import SAMPLE_ARCHIVE, ArchiveReader
from cnnlab.data.readers.csv_list import CsvReader, csv_files
from cnnlab.data.readers.files import not_regular
from cnnlab.data.readers.folder import FolderReader
from cnnlab.data.readers.hf import HfReader, is_hf_dataset
from cnnlab.data.readers.named import NamedReader, default_data_dir
from cnnlab.data.readers.probe import Sizing
from cnnlab.data.readers.reader import ImageReader, Reader
from cnnlab.data.standard import NAMED

__all__ = ["DATASET_CHOICES", "NAMED_DATASETS", "SAMPLE_ARCHIVE", "ImageReader", "Reader", "Sizing", "create_reader",
           "default_data_dir"]

NAMED_DATASETS = tuple(NAMED)
DATASET_CHOICES = (*NAMED_DATASETS, "sample", "folder:PATH")


def create_reader(spec: str, data_dir: str | Path | None = None, download: bool = False) -> Reader:
    """The reader for ``spec`` (one of ``DATASET_CHOICES``); named datasets are looked for in ``data_dir``
    (default :func:`default_data_dir`) and fetched there with ``download``."""
    if spec in NAMED:
        return NamedReader(spec, Path(data_dir).expanduser() if data_dir else default_data_dir(), download)
    if spec == "sample":
        return ArchiveReader(SAMPLE_ARCHIVE)
    if spec.startswith("folder:"):
        location = spec[len("folder:"):]
        if not location:
            raise UserError("`dataset` folder: needs a path, e.g. folder:~/images or folder:images.tar.gz")
        return _folder_reader(Path(location).expanduser())
    raise UserError(f"unknown dataset {spec!r}: choose one of {', '.join(DATASET_CHOICES)}")


def _folder_reader(path: Path) -> ImageReader:
    """The reader of what a ``folder:`` path holds; refused at once when it is none of them."""
    if is_hf_dataset(path):
        return HfReader(path)
    files = csv_files(path)
    if files is not None:
        return CsvReader(path, files)
    if path.is_dir():
        return FolderReader(path)
    if path.is_file() and is_archive(path):
        return ArchiveReader(path)
    if path.is_file():
        raise UserError(f"{path} is neither a folder, a .csv list nor a .tar, .tar.gz, .tgz or .zip archive; "
                        "check the folder:PATH")
    if not path.exists():
        raise UserError(f"{path} does not exist; check the folder:PATH (it may be a folder, a .csv list "
                        "or a .tar.gz/.zip archive)")
    raise not_regular(path, path.stat().st_mode, hint="check the folder:PATH")
