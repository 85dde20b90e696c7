"""A run folder or a checkpoint back into a model, its classes, its preprocessing, its test and
validation sets, and the temperature that calibrates its probabilities.

Everything after training (evaluate, visualize, predict, report, export) starts here.

The temperature is what ``cnnlab evaluate --calibrate`` fitted on the run's validation images
(:func:`cnnlab.core.calibration.fit_temperature`), kept in ``RUN_DIR/calibration.json`` with the stamp
of the checkpoint it was fitted for: a checkpoint that has changed since (retrained, another file) has
no temperature, and its probabilities are the plain softmax.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cnnlab.config import TrainConfig, from_saved
from cnnlab.core import checkpoint
from cnnlab.core.errors import UserError
from cnnlab.core.files import atomic_write
from cnnlab.core.spec import ModelSpec, Preprocess
from cnnlab.data import Dataset, open_dataset
from cnnlab.data.splits import Splits, reported_test_set, split
from cnnlab.data.store import PixelStore, take
from cnnlab.models import build, check_name

CALIBRATION_FILE = "calibration.json"


@dataclass
class LoadedRun:
    model: nn.Module  # in eval mode
    spec: ModelSpec
    preprocess: Preprocess
    classes: list[str]
    config: TrainConfig | None  # the training configuration; None for a checkpoint that carries none
    path: Path  # the checkpoint file
    run_dir: Path | None  # the run folder, when the checkpoint sits in one
    checkpoint: checkpoint.Checkpoint = field(repr=False)
    _test: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _data: Dataset | None = field(default=None, repr=False)  # the run's own dataset, opened once

    @property
    def tta(self) -> bool | str:
        """The test-time augmentation the run scored with (False, True: flips, "translate": flips and shifts):
        what evaluate, predict and report do by default, so that they find the numbers the run reported."""
        return self.config is not None and self.config.tta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def test_set(self, dataset: str | None = None, data_dir: str | None = None,
                 limit_test: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of the test set the run reported on, on the CPU (loaded once).

        ``dataset`` scores another dataset with the same classes (all of its test images unless
        ``limit_test``); ``data_dir`` says where the run's dataset lives now.
        """
        if dataset is None and limit_test is None and self._test is not None:
            return self._test
        saved = self.config
        if dataset is None and saved is None:
            raise UserError(f"{self.path} does not say which dataset it was trained on; give a dataset or image files")
        if limit_test is None and dataset is None:
            limit_test = saved.limit_test  # the same images the run reported on
        data = self._open(dataset, data_dir)
        x, y = reported_test_set(data, limit_test)
        test = (x.read() if isinstance(x, PixelStore) else x, y)  # only these images are read
        if dataset is None:
            self._test = test
        return test

    def validation_set(self, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of the validation images the run held out of its training set (the
        same draw as training's :func:`cnnlab.data.splits.split`), on the CPU."""
        held = self.splits(data_dir)
        x = held.val_x
        return (x.read() if isinstance(x, PixelStore) else x, held.val_y)

    def training_set(self, data_dir: str | None = None) -> tuple[torch.Tensor | PixelStore, torch.Tensor]:
        """The images and labels the run trained on (its validation images held out), on the CPU: uint8
        images, or a store whose slices read them, so that a large training set is read a part at a time."""
        held = self.splits(data_dir)
        return held.train_x, held.train_y

    def splits(self, data_dir: str | None = None) -> Splits:
        """The training, validation and test images as the run drew them (views of the dataset's cache,
        read a batch at a time), with where each sits among the dataset's training images."""
        saved = self.config
        if saved is None:
            raise UserError(f"{self.path} does not say which dataset it was trained on, so its training and "
                            "validation images cannot be found")
        data = self._open(None, data_dir)
        return split(data, saved.limit_train, saved.limit_test, saved.val_split, saved.batch_size)

    def training_images(self, index: torch.Tensor, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels of the run's dataset at positions ``index`` among its training images, on the
        CPU (an ``IndexError`` for a position it does not have)."""
        data = self._open(None, data_dir)
        y = data.train_y[index]
        x = take(data.train_x, index)
        return (x.read() if isinstance(x, PixelStore) else x), y

    def _open(self, dataset: str | None, data_dir: str | None) -> Dataset:
        """``dataset`` (default: the run's own), opened as the run opened it, with the run's classes."""
        saved = self.config
        if dataset is None and data_dir is None and self._data is not None:
            return self._data
        name = dataset or saved.dataset
        data = open_dataset(name, data_dir=data_dir or (saved.data_dir if saved else None),
                            skip_bad_images=saved is not None and saved.skip_bad_images,
                            store_size=saved.store_size if saved else None,
                            image_size=saved.image_size if saved else None)
        check_classes(self, data.classes, name)
        if dataset is None and data_dir is None:
            self._data = data
        return data

    @property
    def temperature(self) -> float | None:
        """The temperature fitted for this checkpoint by ``cnnlab evaluate --calibrate``, else None."""
        found = read_calibration(self)
        return None if found is None else found["temperature"]


def checkpoint_stamp(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint file as it is now: a result stamped with it is stale once it differs."""
    st = path.stat()
    return {"checkpoint": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_calibration(loaded: LoadedRun) -> dict[str, Any] | None:
    """``RUN_DIR/calibration.json`` when it was fitted for ``loaded``'s checkpoint as it is now; None when
    there is none, it is for another checkpoint, or it cannot be read (it is then fitted afresh)."""
    if loaded.run_dir is None:
        return None
    try:
        saved = json.loads(calibration_file(loaded).read_text())
        t = saved["temperature"]
        stamp = saved["stamp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stamp != checkpoint_stamp(loaded.path) or not isinstance(t, (int, float)) or isinstance(t, bool):
        return None
    if not (math.isfinite(t) and t > 0):
        return None
    return saved


def calibration_file(loaded: LoadedRun) -> Path:
    """Where ``loaded``'s temperature is kept: its run folder's ``calibration.json``."""
    if loaded.run_dir is None:
        raise UserError(f"{loaded.path} is not in a run folder (RUN_DIR/checkpoints/), so there is nowhere to "
                        "keep its temperature; give the run folder, or a checkpoint in its checkpoints/")
    return loaded.run_dir / CALIBRATION_FILE


def save_calibration(loaded: LoadedRun, temperature: float, **details: Any) -> Path:
    """Keep ``temperature`` (and ``details``: the validation NLL before and after, …) in the run folder,
    stamped with the checkpoint it was fitted for; written atomically."""
    record = {"temperature": temperature, "stamp": checkpoint_stamp(loaded.path), **details}
    return atomic_write(calibration_file(loaded), json.dumps(record, indent=2))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's best.pt (else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UserError(f"{path} holds no checkpoint (looked for checkpoints/best.pt and checkpoints/last.pt); "
                        "train into it first with: cnnlab train --out " + str(path))
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder or a .pt checkpoint")
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A run folder or checkpoint as a model in eval mode; every field it uses is checked first
    (by :func:`cnnlab.core.checkpoint.read`, and the saved configuration here), and weights that are
    not finite are refused."""
    ckpt_path = find_checkpoint(path)
    ckpt = checkpoint.read(ckpt_path)
    spec = ckpt.spec
    try:
        check_name(spec.name)  # cnnlab's own models, and torchvision:NAME / timm:NAME
    except UserError as e:
        raise UserError(f"{ckpt_path} is for model {spec.name!r}, which this cnnlab cannot build: {e}") from None
    config = None
    if ckpt.config:
        try:
            config = from_saved(ckpt.config, check=False)
            if config.limit_test is not None and config.limit_test < 1:
                raise UserError(f"`limit_test` must be at least 1 (got {config.limit_test})")
        except UserError as e:
            raise UserError(f"{ckpt_path} holds an invalid training configuration: {e}") from None
    model = build(spec.name, num_classes=spec.num_classes, width=spec.width, in_channels=spec.in_channels)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise UserError(f"{ckpt_path} does not match model {spec.name} "
                        f"(width {spec.width}, {spec.num_classes} classes): {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    return LoadedRun(model, spec, ckpt.preprocess, ckpt.classes, config, ckpt_path, run_dir, ckpt)


def check_classes(loaded: LoadedRun, classes: list[str], dataset: str) -> None:
    """A model can only be scored on data whose classes are the ones it was trained on."""
    if list(classes) != loaded.classes:
        raise UserError(f"dataset {dataset} has classes {names_of(classes)} but the model was trained on "
                        f"{names_of(loaded.classes)}; evaluate it on a dataset with the same classes")


def names_of(classes: list[str], most: int = 12) -> str:
    """Class names for a message: the first ``most``, and how many there are where that is not all."""
    shown = ", ".join(classes[:most])
    return shown + (f" … ({len(classes)} in all)" if len(classes) > most else "")
