"""Training configuration: one dataclass, three named recipes, TOML overrides and validation.

Precedence, lowest first: the dataclass defaults, the recipe, a TOML file, command-line flags.
Every value ends up in ``RUN_DIR/config.json`` so a run says exactly what it did.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.core.errors import UserError
from cnnlab.core.spec import MAX_IMAGE_SIZE, MAX_WIDTH
from cnnlab.data import DATASET_CHOICES, NAMED_DATASETS
from cnnlab.models import check_name, default_width, is_external
from cnnlab.models import weights as pretrained

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("none", "flip-crop")
DEVICES = ("auto", "cpu", "cuda")
# MAX_WIDTH and MAX_IMAGE_SIZE (from cnnlab.core.spec, which checks checkpoints against them too):
# beyond them a model no longer fits in memory or a tensor side overflows; say so before trying.
MAX_SEED = 2**63 - 1


@dataclass
class TrainConfig:
    recipe: str = "seed"
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    skip_bad_images: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    val_split: int | None = None  # images held out of train for model selection; None: 10 %
    store_size: int | None = None  # side at which folder images are cached; None: at most image_size
    data_on_device: bool | None = None  # the whole dataset on the device; False: read from the cache; None: if it fits
    # model
    model: str = "resnet18-seed"
    width: int | None = None  # None: the model's own (64 for the ImageNet nets, 16 for the CIFAR nets)
    image_size: int = 224
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # transfer learning
    weights: str | None = None  # DEFAULT, a published weights name, or a file (cnnlab.models.weights)
    freeze: str | None = None  # "backbone" (train only the head) or a layer: freeze it and all before it
    backbone_lr_scale: float = 1.0  # learning rate of everything but the head, relative to --lr
    # optimisation
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "constant"
    label_smoothing: float = 0.0
    augment: str = "none"
    ema: float = 0.0  # decay of a moving average of the weights, scored and saved in their place; 0: off
    tta: bool = False  # score with test-time flip augmentation
    # execution
    device: str = "auto"
    # bf16 autocast. None: on CUDA only; True: where bf16 is native (CUDA, CPUs with bf16 instructions);
    # "force": also on CPUs that would emulate it (cnnlab.train.device.amp_choice)
    amp: bool | str | None = None
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False
    cuda_graphs: bool = False  # compiled steps replayed as CUDA graphs (implies compile; CUDA only)
    sync_bn: bool = False  # with several ranks: BatchNorm statistics of the global batch
    seed: int = 0
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: only at epoch ends
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The assignment exactly; He et al. (2015) §4.2 hyper-parameters at 224 px; a short modern schedule at 32 px
# (its label smoothing and flip TTA chosen on the validation split, BENCHMARKS.md; a weight average did not help).
RECIPES: dict[str, dict[str, Any]] = {
    "seed": dict(
        model="resnet18-seed", image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        epochs=40, batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4,
        schedule="constant", augment="none", label_smoothing=0.0,
    ),
    "paper": dict(
        model="resnet18", image_size=224, mean=CIFAR10_MEAN, std=CIFAR10_STD,
        epochs=40, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
        schedule="cosine", augment="flip-crop", label_smoothing=0.0,
    ),
    "fast": dict(
        model="resnet18-cifar", image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD,
        epochs=18, batch_size=512, lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="onecycle", augment="flip-crop", label_smoothing=0.1, tta=True,  # by benchmarks/recipe.py
    ),
    # Transfer learning: published ImageNet weights, their preprocessing (set by the weights), a short cosine
    # schedule at a low learning rate, and the pretrained layers at a tenth of the new head's rate.
    "finetune": dict(
        model="torchvision:resnet18", weights="DEFAULT", image_size=224, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), epochs=10, batch_size=64, lr=0.01, momentum=0.9, nesterov=True,
        weight_decay=1e-4, schedule="cosine", augment="flip-crop", label_smoothing=0.1, backbone_lr_scale=0.1,
    ),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def resolve(recipe: str | None = None, toml_path: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a validated config from a recipe, an optional TOML file and explicit overrides."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(read_toml(toml_path))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = overrides.get("recipe") or recipe or values.get("recipe") or "seed"
    if not isinstance(name, str) or name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    merged = {**RECIPES[name], **values, **overrides, "recipe": name}
    model = merged.get("model", TrainConfig.model)
    check_name(model)
    if merged.get("width") is None and not is_external(model):
        merged["width"] = default_width(model)
    if merged.get("weights"):
        # The preprocessing the weights were trained with, unless a TOML file or a flag says otherwise.
        given = {**values, **overrides}
        found = pretrained.describe(model, _coerce("weights", merged["weights"])).preprocessing()
        merged.update({k: v for k, v in found.items() if k not in given})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    validate(cfg)
    return cfg


def from_saved(values: Any, check: bool = True) -> TrainConfig:
    """The configuration a checkpoint saved, every value of the type its setting takes.

    Missing settings (a checkpoint from an earlier cnnlab) take their defaults; unknown ones are refused.
    ``check``: also :func:`validate` it, as for a run that trains again; without, only the types are
    checked (a finished run is read as it was trained, even if it could no longer be started so).
    """
    if not isinstance(values, dict):
        raise UserError(f"the saved configuration is {type(values).__name__}, not a table of settings")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if check:
        validate(cfg)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"unknown key {key!r} in {path}; valid keys: {', '.join(sorted(FIELDS))}")
        values[name] = value
    return values


def _coerce(name: str, value: Any) -> Any:
    """Check a value's type against the dataclass field (TOML and Python callers are untyped)."""
    if name not in FIELDS:
        raise UserError(f"unknown setting {name!r}; valid settings: {', '.join(sorted(FIELDS))}")
    default = FIELDS[name].default
    kind = str(FIELDS[name].type)
    if name in ("mean", "std"):
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            raise UserError(f"{name} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if name == "amp":
        if value is None or isinstance(value, bool) or value == "force":
            return value
        raise UserError(f"amp must be true, false or \"force\" (--amp, --no-amp or --amp force), got {value!r}")
    if value is None:
        if "None" in kind:
            return None
        raise UserError(f"{name} must be set")
    if isinstance(default, bool) or kind.startswith("bool"):
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if "int" in kind:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be a whole number, got {value!r}")
        return value
    if "float" in kind:
        if not _is_number(value):
            raise UserError(f"{name} must be a number, got {value!r}")
        return float(value)
    if "str" in kind:
        if not isinstance(value, str):
            raise UserError(f"{name} must be text, got {value!r}")
        return value
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot train, naming the flag and the valid range."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    check_name(cfg.model)
    need(cfg.schedule in SCHEDULES, f"unknown schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    need(cfg.augment in AUGMENTS, f"unknown augment {cfg.augment!r}; choose one of: {', '.join(AUGMENTS)}")
    need(cfg.device in DEVICES, f"unknown device {cfg.device!r}; choose one of: {', '.join(DEVICES)}")
    need(cfg.dataset in (*NAMED_DATASETS, "sample") or cfg.dataset.startswith("folder:") and len(cfg.dataset) > 7,
         f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASET_CHOICES)}")
    need(cfg.epochs >= 1, f"--epochs must be at least 1 (got {cfg.epochs})")
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if is_external(cfg.model):
        need(cfg.width is None, f"--width scales cnnlab's own models; {cfg.model} has its own widths "
                                "(leave --width out)")
    else:
        need(cfg.width is None or 1 <= cfg.width <= MAX_WIDTH,
             f"--width must be between 1 and {MAX_WIDTH} (got {cfg.width})")
    need(cfg.weights is None or bool(cfg.weights), "--weights must be DEFAULT, a weights name or a file")
    need(cfg.freeze is None or bool(cfg.freeze), "--freeze must be backbone or a layer name")
    need(math.isfinite(cfg.backbone_lr_scale) and cfg.backbone_lr_scale >= 0,
         f"--backbone-lr-scale must be a finite number ≥ 0 (got {cfg.backbone_lr_scale})")
    need(8 <= cfg.image_size <= MAX_IMAGE_SIZE,
         f"--image-size must be between 8 and {MAX_IMAGE_SIZE} (got {cfg.image_size})")
    need(cfg.store_size is None or 8 <= cfg.store_size <= MAX_IMAGE_SIZE,
         f"--store-size must be between 8 and {MAX_IMAGE_SIZE} (got {cfg.store_size})")
    for name in ("lr", "momentum", "weight_decay", "label_smoothing"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value >= 0,
             f"--{name.replace('_', '-')} must be a finite number ≥ 0 (got {value})")
    need(cfg.lr > 0, f"--lr must be greater than 0 (got {cfg.lr})")
    need(cfg.momentum < 1, f"--momentum must be below 1 (got {cfg.momentum})")
    need(cfg.label_smoothing < 1, f"--label-smoothing must be below 1 (got {cfg.label_smoothing})")
    need(math.isfinite(cfg.ema) and 0 <= cfg.ema < 1,
         f"--ema must be 0 (off) or a decay below 1 such as 0.999 (got {cfg.ema})")
    need(not cfg.nesterov or cfg.momentum > 0, "--nesterov needs a momentum above 0")
    for name in ("limit_train", "limit_test"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    need(cfg.val_split is None or cfg.val_split >= 0, f"--val-split must be 0 or more images (got {cfg.val_split})")
    need(cfg.checkpoint_every >= 0, f"--checkpoint-every must be 0 or more steps (got {cfg.checkpoint_every})")
    need(len(cfg.mean) == len(cfg.std) and len(cfg.mean) in (1, 3),
         "mean and std must both have 1 or 3 values")
    need(all(s > 0 and math.isfinite(s) for s in cfg.std), "std values must be finite and greater than 0")
    need(all(math.isfinite(m) for m in cfg.mean), "mean values must be finite numbers")
    need(0 <= cfg.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED} (got {cfg.seed})")
