"""A Hugging Face ``DatasetDict`` written with ``save_to_disk``, read through the ``datasets`` package."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cnnlab.core.errors import UserError
from cnnlab.data.readers.files import not_regular
from cnnlab.data.readers.fingerprint import hash_tree
from cnnlab.data.readers.layout import Layout, Source
from cnnlab.data.readers.reader import ImageReader
from cnnlab.data.readers.tree import Tree

HF_EXTRA = "pip install 'cnnlab[hf]'"


def is_hf_dataset(path: Path) -> bool:
    """A Hugging Face ``DatasetDict`` written with ``save_to_disk``."""
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def _load(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a Hugging Face dataset; "
                        f"reading it needs the datasets package: {HF_EXTRA}") from None
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises many kinds for a damaged folder
        raise UserError(f"cannot read the Hugging Face dataset {path} ({type(e).__name__}: {e})") from None
    if not isinstance(saved, datasets.DatasetDict) or not {"train", "test"} <= set(saved):
        found = ", ".join(saved) if isinstance(saved, datasets.DatasetDict) else "a single split"
        raise UserError(f"{path}: a Hugging Face dataset needs train and test splits (it has {found})")
    return saved


def _hf_layout(path: Path) -> Layout:
    """The train and test splits of a saved ``DatasetDict``: its first Image column and its first ClassLabel."""
    saved = _load(path)
    import datasets  # there: _load has read the folder with it
    features = saved["train"].features
    image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise UserError(f"{path}: a Hugging Face dataset needs an Image column and a ClassLabel column "
                        f"(it has {', '.join(f'{n}: {type(f).__name__}' for n, f in features.items())})")
    classes = list(features[label].names)
    saved = saved.cast_column(image, datasets.Image(decode=False))  # encoded bytes: our decoder decodes
    items: dict[str, list[tuple[str, Any, int]]] = {}
    for split in ("train", "test"):
        labels = saved[split][label]
        if any(not 0 <= y < len(classes) for y in labels):
            raise UserError(f"{path}: the {split} split has rows without a label in 0…{len(classes) - 1}")
        items[split] = [(f"{split}[{i}]", (split, i), int(y)) for i, y in enumerate(labels)]

    def resolve(chunk: list[tuple[str, Any]]) -> list[tuple[str, Source]]:
        out: list[tuple[str, Source]] = []
        for split in ("train", "test"):
            rows = [(name, ref[1]) for name, ref in chunk if ref[0] == split]
            if rows:
                cells = saved[split].select([i for _, i in rows])[image]
                out += [(name, cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]))
                        for (name, _), cell in zip(rows, cells)]
        order = {name: k for k, (name, _) in enumerate(chunk)}
        return sorted(out, key=lambda item: order[item[0]])

    return Layout(classes, items, resolve)


class HfReader(ImageReader):
    """A saved ``DatasetDict``, keyed by every file of its folder."""

    def content(self) -> str:
        files = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                files[p.relative_to(self.path).as_posix()] = p
            elif not p.is_dir() and p.exists():  # the library would block on a FIFO, or read a device forever
                raise not_regular(p, p.stat().st_mode)
        return hash_tree(Tree(files, set()))

    def layout(self, scratch: ExitStack) -> Layout:
        return _hf_layout(self.path)
