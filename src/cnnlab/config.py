"""Training configuration: one dataclass, four named recipes, TOML overrides and validation.

Each setting is declared once, as a field of :class:`TrainConfig` whose type says what values it
takes (``Literal`` for a choice) and whose metadata (:func:`setting`) holds its help text and range.
The command line's flags (:func:`cnnlab.cli.build_parser`), the TOML keys and :func:`validate` are
derived from those declarations.

Precedence, lowest first: the dataclass defaults, the recipe, a TOML file, command-line flags.
Every value ends up in ``RUN_DIR/config.json`` so a run says exactly what it did.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cnnlab.core.errors import UserError
from cnnlab.core.limits import MAX_IMAGE_SIZE, MAX_WIDTH

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The command line builds its flags from this module, so that `cnnlab --help` answers at once it imports
# nothing that imports torch at its top: the data and model registries are imported where they are used.
MAX_SEED = 2**63 - 1


def setting(default: Any, help: str | None = None, *, least: float | None = None, most: float | None = None,
            above: float | None = None, below: float | None = None, unit: str = "", flag: bool = True,
            metavar: str | None = None) -> Any:
    """A field of :class:`TrainConfig` with what the command line and :func:`validate` need to know.

    ``least``/``most``: inclusive bounds; ``above``/``below``: exclusive ones; ``unit`` words the bound
    ("images"); ``flag``: whether the command line offers it (else only TOML and Python set it);
    ``metavar``: how its help names the free text a yes-or-no setting may take instead (``--mlflow [URI]``).
    """
    return dataclasses.field(default=default, metadata=dict(help=help, least=least, most=most, above=above,
                                                            below=below, unit=unit, flag=flag, metavar=metavar))


# A run's ``tta`` setting by name, as export's metadata writes it and evaluate's and predict's --tta read it.
TTA_NAMES: dict[bool | str, str] = {False: "none", True: "flip", "translate": "translate"}


@dataclass
class TrainConfig:
    recipe: str = setting("seed", "seed (the assignment), paper, fast, finetune (published weights, lower "
                                  "backbone learning rate) or airbench (Jordan 2024's method and network)")
    # data
    dataset: str = setting("cifar10", "cifar10, cifar100, mnist, fashion-mnist, svhn, stl10, sample or folder:PATH "
                                      "(a folder or .tar/.tar.gz/.zip of train/<class>/ and test/<class>/, or a CSV "
                                      "of path,label,split)")
    data_dir: str | None = setting(None, "where named datasets are looked for and downloaded (default "
                                         "~/.cache/cnnlab/data)")
    download: bool = setting(False, "download a named dataset if it is not in --data-dir")
    skip_bad_images: bool = setting(False, "leave out images that cannot be decoded (they are counted and listed) "
                                           "instead of stopping")
    limit_train: int | None = setting(None, "train on a random subset of N images", least=1)
    limit_test: int | None = setting(None, "report on a random subset of N test images", least=1)
    val_split: int | None = setting(None, "images held out of the training set to pick best.pt (default 10%%; 0 "
                                          "for none)", least=0, unit="images")
    store_size: int | None = setting(None, "side in pixels at which folder images are cached (default: as they "
                                           "are, or the --image-size when larger or of mixed sizes)",
                                     least=8, most=MAX_IMAGE_SIZE)
    data_on_device: bool | None = setting(None, "hold the whole dataset on the training device (--no-data-on-device: "
                                                "read each batch from the memory-mapped cache; default: on the device "
                                                "when it fits)")
    # model
    model: str = setting("resnet18-seed", "a model of `cnnlab models` (resnet18 … resnet152, plain18/34, resnet20 … "
                                          "resnet110, plain20 … plain56, alexnet, vgg11, vgg16, their -cifar forms), "
                                          "torchvision:NAME or timm:NAME")
    width: int | None = setting(None, "base channels of cnnlab's own models (default: the paper's, 64 or 16 for the "
                                      "CIFAR nets; smaller trains quickly on a CPU)", least=1, most=MAX_WIDTH)
    image_size: int = setting(224, "side of the square network input in pixels", least=8, most=MAX_IMAGE_SIZE)
    mean: tuple[float, ...] = setting((0.5, 0.5, 0.5), flag=False)
    std: tuple[float, ...] = setting((0.5, 0.5, 0.5), flag=False)
    # transfer learning
    weights: str | None = setting(None, "start from DEFAULT or a named set of torchvision's or timm's published "
                                        "weights, or a file (a cnnlab checkpoint or a state dict); their "
                                        "preprocessing becomes the run's")
    freeze: str | None = setting(None, "backbone (train only the classifier) or a layer (stage name or module path): "
                                       "freeze it and everything before it")
    backbone_lr_scale: float = setting(1.0, "learning rate of everything but the classifier, as a fraction of --lr "
                                            "(e.g. 0.1)", least=0)
    # optimisation
    epochs: int = setting(40, least=1)
    batch_size: int = setting(64, least=1)
    lr: float = setting(0.01, "learning rate (peak for onecycle)", above=0)
    momentum: float = setting(0.9, least=0, below=1)
    nesterov: bool = setting(False)
    weight_decay: float = setting(5e-4, least=0)
    norm_lr_scale: float = setting(1.0, "learning rate of the BatchNorm parameters as a multiple of --lr, their "
                                        "weight decay per step unchanged (airbench: 64)", above=0)
    schedule: Literal["constant", "cosine", "onecycle", "triangle"] = setting(
        "constant", "constant, cosine, onecycle or triangle (airbench's: linear from 0.2× up to --lr at 23%% of the "
                    "steps, down to 0.07× at the end)")
    label_smoothing: float = setting(0.0, least=0, below=1)
    augment: Literal["none", "flip-crop"] = setting("none")
    alternate_flips: bool = setting(False, "with --augment flip-crop: flip each image on alternate epochs (a random "
                                           "half on even epochs, the other half on odd ones) instead of at random")
    translate: int | None = setting(None, "with --augment flip-crop: shift by up to N pixels, padding by reflection "
                                          "(default: 4, padding with zeros)", least=0, most=16, unit="pixels")
    whiten: bool = setting(False, "initialise the first convolution to whiten the patches of the first 5,000 "
                                  "training images, its filters then fixed")
    whiten_bias_epochs: int | None = setting(None, "with --whiten: epochs the first convolution's bias trains "
                                                   "before it is fixed too (default: all)", least=0, unit="epochs")
    dirac_init: bool = setting(False, "initialise every convolution but the first as the identity on its first "
                                      "input channels")
    ema: float = setting(0.0, "decay of a moving average of the weights, scored and saved in their place (0: off; "
                              "e.g. 0.999)", least=0, below=1)
    lookahead: int = setting(0, "every N steps, blend a weight average toward the weights and continue from it, at "
                                "a rate that falls over the run (airbench's; 0: off)", least=0, unit="steps")
    lookahead_from: int = setting(0, "with --lookahead: the epochs trained before the blending starts", least=0,
                                  unit="epochs")
    tta: bool | Literal["translate"] = setting(
        False, "score validation and test images with test-time flip augmentation (--tta or --tta flip); --tta "
               "translate: also with 1-pixel shifts up-left and down-right (6 views, airbench's)")
    early_stop: int | None = setting(None, "end training when the validation figure --early-stop-metric has not "
                                           "improved for this many epochs; best.pt is the run's result",
                                     least=1, unit="epochs")
    early_stop_metric: Literal["val_acc", "val_loss"] = setting(
        "val_acc", "the validation figure that picks best.pt and that --early-stop watches: val_acc (higher is "
                   "better) or val_loss (lower is better)")
    # execution
    device: Literal["auto", "cpu", "cuda"] = setting("auto")
    # None: on CUDA only; True: where bf16 is native (CUDA, CPUs with bf16 instructions); "force": also on
    # CPUs that would emulate it (cnnlab.train.device.amp_choice)
    amp: bool | Literal["force"] | None = setting(
        None, "bf16 autocast where bf16 is native: CUDA, or a CPU with bf16 instructions (elsewhere a note, and "
              "fp32); --amp force: bf16 even on a CPU without (default: on CUDA)")
    channels_last: bool | None = setting(None, "default: on CUDA")
    compile: bool = setting(False, "torch.compile the model")
    cuda_graphs: bool = setting(False, "replay each compiled step as a CUDA graph (implies --compile; CUDA only)")
    sync_bn: bool = setting(False, "with torchrun: normalise with the statistics of the whole global batch")
    seed: int = setting(0, least=0, most=MAX_SEED)
    checkpoint_every: int = setting(0, "also write last.pt every N steps", least=0, unit="steps")
    out: str | None = setting(None, "the run folder (default runs/RECIPE-MODEL-TIME)")
    # tracking (TensorBoard, in RUN_DIR/tb, is always written)
    mlflow: bool | str = setting(False, "also log the settings, each epoch's figures, the checkpoints and the report "
                                        "to MLflow: to a store in the run folder (RUN_DIR/mlflow), or to the tracking "
                                        "URI given; needs: pip install 'cnnlab[mlflow]'", metavar="URI")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The assignment exactly; He et al. (2015) §4.2 hyper-parameters at 224 px; a short modern schedule at 32 px
# (its label smoothing and flip TTA chosen on the validation split, BENCHMARKS.md; a weight average did not help);
# airbench94's method (Jordan 2024) with its network.
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
    # airbench94.py's hyper-parameters in cnnlab's terms. Its loss is summed over the batch and its rates are
    # "per 1024 images", divided by 1024·(1 + 1/(1 − momentum)); for a mean loss at batch 1024 that is
    # lr = 11.5 / (1 + 1/0.15) = 1.5, and its decay per step, 0.0153·1024 / (1024·(1 + 1/0.15)) = lr × 2·0.0153/23.
    # 10 epochs for its 9.9; its alternating flips, 2-pixel reflected shifts, whitened first layer (bias
    # trained 3 epochs), identity-initialised convolutions, Lookahead average every 5 steps from epoch 3 and
    # six-view TTA.
    "airbench": dict(
        model="airbench94", image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD,
        epochs=10, batch_size=1024, lr=1.5, momentum=0.85, nesterov=True, weight_decay=2 * 0.0153 / 23,
        norm_lr_scale=64.0, schedule="triangle", augment="flip-crop", alternate_flips=True, translate=2,
        label_smoothing=0.2, whiten=True, whiten_bias_epochs=3, dirac_init=True, lookahead=5, lookahead_from=3,
        tta="translate",
    ),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def kinds(name: str) -> tuple[Any, ...]:
    """The types a setting's value may have: ``int | None`` → ``(int, NoneType)``; a ``Literal`` stays whole."""
    hint = TYPES[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def choices(name: str) -> tuple[str, ...]:
    """The texts a setting accepts, from the ``Literal`` in its type (empty for free text)."""
    return tuple(c for k in kinds(name) if typing.get_origin(k) is Literal for c in typing.get_args(k))


def resolve(recipe: str | None = None, toml_path: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a validated config from a recipe, an optional TOML file and explicit overrides."""
    from cnnlab.models import check_name, default_width, is_external
    from cnnlab.models import weights as pretrained

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
        found = pretrained.describe(model, coerce("weights", merged["weights"])).preprocessing()
        merged.update({k: v for k, v in found.items() if k not in given})
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in merged.items()})
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
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)


# Each kind a setting's type is made of: what passes as it, how it is said, and how it is stored
# (numbers become floats, lists of numbers tuples of floats).
_KINDS: dict[Any, tuple[Any, str, Any]] = {
    bool: (lambda v: isinstance(v, bool), "true, false", None),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number", None),
    float: (_is_number, "a number", float),
    str: (lambda v: isinstance(v, str), "text", None),
    tuple[float, ...]: (_numbers, "a list of numbers", lambda v: tuple(map(float, v))),
}


def coerce(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` stores it, checked against the field's type (TOML and Python
    callers are untyped)."""
    if name not in FIELDS:
        raise UserError(f"unknown setting {name!r}; valid settings: {', '.join(sorted(FIELDS))}")
    allowed = kinds(name)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"`{name}` must be set")
    if isinstance(value, str) and value in choices(name):
        return value
    for kind in allowed:
        if kind in _KINDS and _KINDS[kind][0](value):
            convert = _KINDS[kind][2]
            return convert(value) if convert else value
    options = choices(name)
    said = [_KINDS[k][1] for k in allowed if k in _KINDS] + [f'"{c}"' for c in options]
    if options and len(said) == len(options):
        raise UserError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of: {', '.join(options)}")
    text = ", ".join(said)
    if "," in text:
        head, _, last = text.rpartition(", ")
        text = f"{head} or {last}"
    raise UserError(f"`{name}` must be {text}, got {value!r}")


def _bounds(name: str, value: float) -> str | None:
    """What is wrong with a number against its setting's declared range, or None."""
    m = FIELDS[name].metadata
    least, most, above, below, unit = m["least"], m["most"], m["above"], m["below"], m["unit"]
    if isinstance(value, float) and not math.isfinite(value):
        return f"`{name}` must be a finite number (got {value})"
    if least is not None and most is not None and not least <= value <= most:
        return f"`{name}` must be between {least} and {most} (got {value})"
    if least is not None and value < least:
        return f"`{name}` must be {least} or more {unit} (got {value})" if unit else \
            f"`{name}` must be at least {least} (got {value})"
    if above is not None and value <= above:
        return f"`{name}` must be greater than {above} (got {value})"
    if below is not None and value >= below:
        return f"`{name}` must be below {below} (got {value})"
    return None


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot train, naming the setting and the valid range: each setting against
    its declaration, then the few rules that tie settings together."""
    for name in FIELDS:
        value = getattr(cfg, name)
        coerce(name, value)  # a TrainConfig built directly in Python is untyped too
        if _is_number(value):
            problem = _bounds(name, value)
            if problem:
                raise UserError(problem)
    _validate_together(cfg)


def _validate_together(cfg: TrainConfig) -> None:
    from cnnlab.data import DATASET_CHOICES, NAMED_DATASETS
    from cnnlab.models import check_name, is_external

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    check_name(cfg.model)
    need(cfg.dataset in (*NAMED_DATASETS, "sample") or cfg.dataset.startswith("folder:") and len(cfg.dataset) > 7,
         f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASET_CHOICES)}")
    if is_external(cfg.model):
        need(cfg.width is None, f"`width` scales cnnlab's own models; {cfg.model} has its own widths "
                                "(leave `width` out)")
    need(cfg.weights is None or bool(cfg.weights), "`weights` must be DEFAULT, a weights name or a file")
    need(cfg.freeze is None or bool(cfg.freeze), "`freeze` must be backbone or a layer name")
    need(not cfg.nesterov or cfg.momentum > 0, "`nesterov` needs a `momentum` above 0")
    need(not (cfg.ema and cfg.lookahead), "`ema` and `lookahead` are two weight averages; choose one")
    need(not (cfg.whiten and cfg.weights), "`whiten` initialises the first convolution afresh, and `weights` "
                                           "loads it; choose one")
    need(cfg.early_stop is None or cfg.val_split != 0,
         "`early_stop` watches the validation split, which `val_split` 0 leaves empty; hold out images with "
         "`val_split` N, or drop `early_stop`")
    need(len(cfg.mean) == len(cfg.std) and len(cfg.mean) in (1, 3),
         "`mean` and `std` must both have 1 or 3 values")
    need(all(s > 0 and math.isfinite(s) for s in cfg.std), "`std` values must be finite and greater than 0")
    need(all(math.isfinite(m) for m in cfg.mean), "`mean` values must be finite numbers")
    need(not isinstance(cfg.mlflow, str) or bool(cfg.mlflow.strip()),
         "`mlflow` must be a tracking URI (sqlite:///FILE.db, http://HOST:PORT), or given alone for the store in the "
         "run folder")
