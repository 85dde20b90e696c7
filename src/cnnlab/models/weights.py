"""Pretrained weights: torchvision's and timm's published ones, or a local file, into a freshly built model.

``--weights`` takes

- ``DEFAULT`` or a weights name (``IMAGENET1K_V1`` for torchvision; a pretrained tag such as
  ``a1_in1k`` for timm): the library's published weights, fetched by the library itself — torchvision's
  ``load_state_dict_from_url`` (cached in ``$TORCH_HOME/hub/checkpoints/<file>``, the SHA-256 prefix in
  the file name checked when it downloads), timm's Hugging Face Hub download (cached in
  ``$HF_HOME/hub``). Nothing else downloads anything, and an offline machine gets one line saying where
  the file would be cached.
- a file: a cnnlab checkpoint (its ``model`` weights and its preprocessing), or a state dict as
  torchvision and timm publish them (``.pth``/``.pt`` read with ``torch.load(weights_only=True)``, or
  ``.safetensors``), optionally under a ``state_dict`` or ``model`` key.

The classifier is sized for the run's classes: where the file's head has another number of classes, the
head keeps its fresh initialisation (the usual transfer recipe). Weights for a 3-channel stem are
summed over the colours for a 1-channel model. Anything else that does not fit is refused, naming it.
The preprocessing the weights were trained with (input size, mean, std) comes back with them, for the
run to adopt (:func:`describe` says it without loading anything).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.core import checkpoint
from cnnlab.core.checkpoint import non_finite
from cnnlab.core.errors import UserError
from cnnlab.core.spec import Preprocess
from cnnlab.models.anatomy import first_conv_path, head_path
from cnnlab.models.external import TIMM, TORCHVISION, check_external, is_external, source_and_arch

__all__ = ["Weights", "describe", "load", "read_state_dict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """Where weights come from and the preprocessing they expect (None where the source does not say)."""

    source: str  # "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1", "timm:resnet18.a1_in1k", "file:PATH"
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def preprocessing(self) -> dict[str, Any]:
        """The config values these weights set: ``image_size``, ``mean``, ``std`` (those they know)."""
        return {k: v for k, v in (("image_size", self.image_size), ("mean", self.mean), ("std", self.std))
                if v is not None}


def _is_file_like(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")) \
        or Path(weights).exists()


def describe(model: str, weights: str) -> Weights:
    """What ``--weights weights`` means for ``--model model``, checked but not loaded (a file is read)."""
    if not isinstance(weights, str) or not weights:
        raise UserError(f"`weights` must be DEFAULT, a weights name or a file (got {weights!r})")
    if _is_file_like(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"`weights` {weights}: no such file; give DEFAULT, a published weights name or a "
                            "weights file (a cnnlab checkpoint or a state dict)")
        state = _read(path)
        pre = state.get("preprocess") if _is_cnnlab_checkpoint(state) else None
        if pre is not None:
            try:
                checked = Preprocess.from_dict(pre, "preprocess")
            except ValueError as e:
                raise UserError(f"`weights` {path}: its {e}; give a checkpoint that cnnlab train wrote, or a "
                                "state dict") from None
            return Weights(f"file:{path}", checked.size, checked.mean, checked.std)
        return Weights(f"file:{path}")
    if not is_external(model):
        raise UserError(f"model {model} has no published weights (only torchvision: and timm: models do); give "
                        "`weights` PATH, a cnnlab checkpoint or a state dict file")
    check_external(model)
    source, arch = source_and_arch(model)
    if source == "torchvision":
        w = _torchvision_weights(arch, weights)
        t = w.transforms()
        return Weights(f"{TORCHVISION}{w}", int(t.crop_size[0]), tuple(t.mean), tuple(t.std))
    name, cfg = _timm_weights(arch, weights)
    return Weights(f"{TIMM}{name}", int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std))


def _torchvision_weights(arch: str, weights: str):
    import torchvision.models

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise UserError(f"torchvision publishes no weights for {arch}; give `weights` PATH") from None
    names = [w.name for w in enum]
    if weights == "DEFAULT":
        return enum.DEFAULT
    wanted = weights.split(".")[-1]
    if weights.count(".") > 1 or (weights.count(".") == 1 and weights.split(".")[0] != enum.__name__) \
            or wanted not in names:
        raise UserError(f"torchvision has no weights {weights!r} for {arch}; choose DEFAULT or one of: "
                        f"{', '.join(names)}")
    return enum[wanted]


def _timm_weights(arch: str, weights: str):
    """timm's full weights name (``ARCH.TAG``) and its pretrained config, for ``--weights DEFAULT|TAG``."""
    import timm

    base, _, tag = arch.partition(".")
    tags = timm.list_pretrained(f"{base}.*")
    if not tags:
        raise UserError(f"timm publishes no weights for {base}; give `weights` PATH")
    if weights == "DEFAULT":
        cfg = timm.models.get_pretrained_cfg(arch)
        name = arch if tag else f"{base}.{cfg.tag}" if cfg is not None and cfg.tag else tags[0]
    else:
        name = weights if weights.startswith(base + ".") else f"{base}.{weights}"
    cfg = timm.models.get_pretrained_cfg(name) if name in tags else None
    if cfg is None:
        raise UserError(f"timm has no weights {weights!r} for {base}; choose DEFAULT or one of: "
                        f"{', '.join(t.split('.', 1)[1] for t in tags)}")
    return name, cfg


def _read(path: Path) -> dict[str, Any]:
    """A weights file as a dict, read without running code."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"cannot read weights file {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    state = checkpoint.torch_load(path, "weights file")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict (a {type(state).__name__}); save model.state_dict()")
    return state


def _is_cnnlab_checkpoint(state: dict[str, Any]) -> bool:
    return "model_spec" in state and isinstance(state.get("model"), dict)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file: a cnnlab checkpoint's ``model``, a ``state_dict``/``model`` entry, or the
    file itself; ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes removed."""
    path = Path(path).expanduser()
    state: Any = _read(path)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no weights (no tensors in it)")
    _check_tensors(tensors, path)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _check_tensors(tensors: dict[Any, Tensor], path: Path) -> None:
    """What a state dict must be to train from: named by text, dense, finite (weights that are NaN would
    only show as a divergence at the first step)."""
    for key, tensor in tensors.items():
        if not isinstance(key, str):
            raise UserError(f"{path}: the keys of a state dict must be text (parameter names), not {key!r}; "
                            "save model.state_dict()")
        if tensor.layout != torch.strided:
            raise UserError(f"{path}: {key} is a sparse tensor; weights must be dense (save tensor.to_dense())")
    bad = non_finite(tensors)
    if bad is not None:
        raise UserError(f"{path} holds non-finite values (NaN or infinity) in {bad}: it was saved by a run that "
                        "diverged or was damaged; give other weights")


def load(model: nn.Module, name: str, weights: str) -> Weights:
    """Put the weights ``--weights weights`` names into ``model`` (built by ``build(name, …)``)."""
    info = describe(name, weights)
    if info.source.startswith("file:"):
        state = read_state_dict(info.source[5:])
        where = info.source[5:]
    elif info.source.startswith(TORCHVISION):
        state = _download_torchvision(name, weights)
        where = info.source
    else:
        state = _download_timm(model, info.source[len(TIMM):])
        where = info.source
    merge(model, state, where)
    return info


def _download_torchvision(name: str, weights: str) -> dict[str, Tensor]:
    w = _torchvision_weights(source_and_arch(name)[1], weights)
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch is a RuntimeError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise UserError(f"cannot get torchvision's {w} ({w.url}): {str(e).splitlines()[0]}; on a machine "
                        f"without internet, put the file at {cached}") from None


def _download_timm(model: nn.Module, name: str) -> dict[str, Tensor]:
    import timm

    head = head_path(model)
    classes = model.get_submodule(head).weight.shape[0] if head else 1000
    conv = first_conv_path(model)
    channels = model.get_submodule(conv).weight.shape[1] if conv else 3
    try:
        pretrained = timm.create_model(name, pretrained=True, num_classes=classes, in_chans=channels)
    except Exception as e:  # the Hub client's errors: offline, not cached, not found, bad checksum
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot get timm's {name} weights: {message}; on a machine without internet, put "
                        "them in the Hugging Face cache ($HF_HOME/hub) or give `weights` PATH") from None
    return pretrained.state_dict()


def merge(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load ``state`` into ``model``: all of it, except a head with another number of classes (kept fresh)
    and a stem for another number of channels (summed or spread over the model's channels)."""
    own = model.state_dict()
    head = head_path(model)
    stem = first_conv_path(model)
    head_keys = {f"{head}.{k}" for k in ("weight", "bias")} if head else set()
    merged: dict[str, Tensor] = {}
    fresh_head, bad = [], []
    for key, value in own.items():
        if key not in state:
            continue
        theirs = state[key]
        if theirs.shape == value.shape:
            merged[key] = theirs.to(value.dtype)
        elif key in head_keys:
            fresh_head.append(key)
        elif stem and key == f"{stem}.weight" and theirs.ndim == 4 and theirs.shape[0] == value.shape[0] \
                and theirs.shape[2:] == value.shape[2:]:
            merged[key] = _adapt_stem(theirs, value.shape[1]).to(value.dtype)
        else:
            bad.append(f"{key} {list(theirs.shape)} (the model has {list(value.shape)})")
    if bad:
        raise UserError(f"the weights in {where} do not fit this model: {'; '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    missing = [k for k in own if k not in merged and k not in head_keys and not k.endswith("num_batches_tracked")]
    if not merged or missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"the weights in {where} are not for this model: "
                        f"{'none of its weights are there' if not merged else 'missing ' + shown}")
    ignored = [k for k in state if k not in own]
    if ignored:
        log.info(f"weights: {len(ignored)} tensor(s) of {where} that this model does not have were left out "
                 f"({', '.join(ignored[:3])}{' …' if len(ignored) > 3 else ''})")
    if fresh_head:
        log.info(f"weights: the head ({head}) is new, for this run's classes; everything else comes from {where}")
    model.load_state_dict({**own, **merged})


def _adapt_stem(weight: Tensor, channels: int) -> Tensor:
    """First-layer filters for ``channels`` inputs from filters for another count (timm's rule: a gray input
    gets the sum over RGB; more channels repeat the colours, scaled to keep the response)."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    repeats = -(-channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)
