"""The transfer-learning recipe's two levers: freezing part of a network and a lower learning rate for the backbone.

``--freeze backbone`` trains only the head (the classifier, see :func:`cnnlab.models.anatomy.head_path`);
``--freeze LAYER`` (a stage name such as ``conv4_x`` or a module path) freezes every parameter up to and
including that layer, in the model's module order, and trains what comes after. Frozen parameters get no
gradient and frozen batch-norm layers keep the statistics they came with (they run in eval mode even
while the rest trains), so the frozen part computes exactly what it did before.

``--backbone-lr-scale S`` gives every trainable parameter outside the head the learning rate × S (e.g. 0.1).
``--norm-lr-scale S`` gives the BatchNorm parameters the learning rate × S, with their weight decay divided
by S so that each step decays them by as much as the others (airbench's bias scaler, 64).
"""

from __future__ import annotations

from torch import nn

from cnnlab.core.errors import UserError
from cnnlab.models.anatomy import head_path, stage_paths

__all__ = ["freeze", "frozen_prefix", "param_groups"]


class _KeepEval:
    """A forward pre-hook on the whole model: the frozen batch norms run in eval mode whatever mode the model
    is in. By path, so that it still finds them after a conversion to synchronised batch norm."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __call__(self, model: nn.Module, _inputs) -> None:
        if model.training:
            for path in self.paths:
                model.get_submodule(path).train(False)


def frozen_prefix(model: nn.Module, what: str) -> list[str]:
    """The names of the parameters ``--freeze what`` freezes (a UserError for a layer the model lacks)."""
    names = [n for n, _ in model.named_parameters()]
    head = head_path(model)
    if what == "backbone":
        if head is None:
            raise UserError("`freeze` backbone: the model has no classifier layer to keep training")
        return [n for n in names if not n.startswith(head + ".")]
    stages = stage_paths(model)
    path = stages.get(what, what)
    modules = [p for p, _ in model.named_modules()]
    if not path or path not in modules:
        shown = ", ".join(s for s in stages if s not in ("pool", "fc"))
        raise UserError(f"`freeze` {what}: the model has no such layer; give backbone (train only the head)"
                        + (f", a stage ({shown})" if shown else "") + " or a module path such as "
                        + (modules[len(modules) // 2] if modules else "features"))
    position = modules.index(path)
    before = set(modules[:position + 1])
    frozen = [n for n in names if n.rpartition(".")[0] in before or n.startswith(path + ".")]
    if head and any(n.startswith(head + ".") for n in frozen):
        raise UserError(f"`freeze` {what} would freeze the classifier ({head}) too; nothing would train")
    return frozen


def freeze(model: nn.Module, what: str | None) -> list[str]:
    """Freeze what ``--freeze what`` names (nothing for None); returns the frozen parameters' names."""
    if not what:
        return []
    frozen = set(frozen_prefix(model, what))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    norms = [path for path, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{path}.weight" in frozen]
    if norms:
        model.register_forward_pre_hook(_KeepEval(norms))
    return sorted(frozen)


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float = 1.0, norm_lr_scale: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: the head at ``lr`` first (the learning rate a run logs), then the rest
    at ``lr × backbone_lr_scale``; frozen parameters are left out. With a ``norm_lr_scale`` other than 1, the
    BatchNorm parameters of each follow it in a group of their own at that multiple of its rate, and with
    ``weight_decay`` ÷ ``norm_lr_scale``: the same decay per step."""
    head = head_path(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    in_head = [p for n, p in trainable if head and n.startswith(head + ".")]
    rest = [p for n, p in trainable if not (head and n.startswith(head + "."))]
    if backbone_lr_scale == 1.0 or not in_head:  # one group, in the model's order (as runs before this had it)
        groups = [{"params": [p for _, p in trainable], "lr": lr}] if trainable else []
    else:
        groups = [{"params": in_head, "lr": lr}]
        if rest:
            groups.append({"params": rest, "lr": lr * backbone_lr_scale})
    if norm_lr_scale == 1.0:
        return groups
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False)}
    split = []
    for group in groups:
        own = [p for p in group["params"] if id(p) not in norms]
        theirs = [p for p in group["params"] if id(p) in norms]
        split += [{"params": own, "lr": group["lr"]}] if own else []
        split += [{"params": theirs, "lr": group["lr"] * norm_lr_scale,
                   "weight_decay": weight_decay / norm_lr_scale}] if theirs else []
    return split
