"""The explanation checks on an opened run: :func:`cnnlab.viz.sanity.sanity_checks` with the run's images,
the registry's explainers, and the model for the data randomisation test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from torch import nn

from cnnlab import run as runs
from cnnlab.core.errors import UserError
from cnnlab.inspect.inspector import Inspection
from cnnlab.inspect.registry import METHODS, explainers
from cnnlab.inspect.results import Images, Sanity
from cnnlab.viz.sanity import cascade_steps, sanity_checks, train_on_permuted_labels

__all__ = ["RANDOM_LABELS_BUDGET", "RandomLabels", "check_steps", "random_labels_model", "sanity"]

# Training on permuted labels is affordable when an epoch costs at most this many multiply-accumulates
# (forward and backward ≈ 3 × the forward's): about a minute of a laptop CPU.
RANDOM_LABELS_BUDGET = 2e12

RandomLabels = Literal["auto"] | int | Path | None  # how the data randomisation test gets its model


def random_labels_model(inspection: Inspection, random_labels: RandomLabels) -> tuple[nn.Module | None, str]:
    """The model for the data randomisation test, and a line saying what it is: the run at the path given,
    one trained here for the epochs given, for one epoch where that is cheap (``"auto"``), or none."""
    if random_labels is None:
        return None, "not run (give `random_labels`: a run trained on permuted labels, or epochs to train one)"
    loaded = inspection.run
    if isinstance(random_labels, Path):
        other = runs.load(random_labels, device=loaded.device)
        if other.spec != loaded.spec:
            raise UserError(f"`random_labels` {random_labels} holds a {other.spec.name} of width {other.spec.width} "
                            f"for {other.spec.num_classes} classes; the run checked is a {loaded.spec.name} of width "
                            f"{loaded.spec.width} for {loaded.spec.num_classes}: give the same architecture")
        return other.model, f"the model of {other.path}, trained on permuted labels"
    auto = random_labels == "auto"
    if not auto and (not isinstance(random_labels, int) or random_labels < 1):
        raise UserError(f"`random_labels` {random_labels!r} is not a number of epochs: give 1 or more epochs, a run "
                        "trained on permuted labels, auto or none")
    epochs = 1 if auto else int(random_labels)
    return _trained_on_permuted_labels(inspection, epochs, auto)


def _trained_on_permuted_labels(inspection: Inspection, epochs: int, auto: bool) -> tuple[nn.Module | None, str]:
    from cnnlab.data import load_dataset
    from cnnlab.data.splits import split

    loaded = inspection.run
    cfg = loaded.config
    if cfg is None:
        return None, "not run: the checkpoint does not say which dataset it was trained on"
    try:
        data = split(load_dataset(cfg.dataset, data_dir=inspection.data_dir or cfg.data_dir,
                                  skip_bad_images=cfg.skip_bad_images),
                     cfg.limit_train, cfg.limit_test, cfg.val_split)
    except UserError as e:
        if not auto:
            raise
        return None, f"not run: the training images could not be read ({e})"
    cost = 3 * inspection.summary()["macs"] * len(data.train_y) * epochs
    if auto and cost > RANDOM_LABELS_BUDGET:
        return None, (f"not run: an epoch on permuted labels would cost {cost:.1e} multiply-accumulates; "
                      "give `random_labels` (epochs, or a run trained on permuted labels) to run it")
    model = train_on_permuted_labels(loaded.model, data.train_x, data.train_y,
                                     lambda u: loaded.preprocess.to_input(u), epochs=epochs)
    return model, (f"a fresh {loaded.spec.name} trained here for {epochs} epoch{'s' if epochs != 1 else ''} on the "
                   f"{len(data.train_y)} training images with their labels permuted")


def check_steps(inspection: Inspection, layers: Sequence[str]) -> list[str]:
    """The cascade steps ``layers`` checked (a ``UserError`` naming a bad one), before any work is done."""
    return cascade_steps(inspection.model, inspection.layers(layers) or None)[0]


def sanity(inspection: Inspection, images: Images, *, kinds: Sequence[str] = (), layers: Sequence[str] = (),
           random_labels: RandomLabels = None, quick: bool = False,
           progress: Callable[[str], None] | None = None) -> Sanity:
    """Every check of the CAMs and attributions ``kinds`` (default: all) on ``images``; ``layers``: the cascade
    steps to measure (default: all). ``quick``: the report's smaller settings (``METHODS["sanity"].quick``,
    occlusion's windows without overlap); the data randomisation test then is not run."""
    method = METHODS["sanity"]
    names = method.pick(kinds)
    check_steps(inspection, layers)
    if quick:
        settings = method.quick
        window = max(2, inspection.preprocess.size // 8)  # occlusion's own window, without overlap here
        result = sanity_checks(inspection.model, images.x, explainers(names), layers=list(settings["layer"]),
                               deletion_steps=settings["deletion_steps"], road_fractions=settings["road_fractions"],
                               options={"occlusion": {"stride": window}}, progress=progress,
                               random_labels_note="not run in the report; cnnlab visualize sanity runs it")
    else:
        other, note = random_labels_model(inspection, random_labels)
        result = sanity_checks(inspection.model, images.x, explainers(names), layers=list(layers) or None,
                               random_labels=other, random_labels_note=note, progress=progress)
    result.names = images.names
    return result
