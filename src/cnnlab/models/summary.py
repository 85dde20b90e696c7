"""Table 1 of He et al. 2015 for any model, with parameters and MACs counted, not quoted.

The numbers come from the model itself: parameters are summed over the modules of each row and
multiply-accumulates are counted by forward hooks on every ``Conv2d`` and ``Linear`` during one forward
pass of a zero image. A model whose layout drifts from the paper therefore shows the drift
(``resnet18-seed`` costs about 3.2 GMACs at 224 px against the paper's 1.8).

Rows are the model's stages where it has them (Table 1's conv1, conv2_x … conv5_x, pool, fc for the
ResNets; conv1 … conv5, pool, fc for AlexNet and VGG), else its top-level modules (a top-level sequence
of blocks, such as torchvision's ``features``, one row per block). A module outside every row — the
stem's batch norm of a torchvision ResNet, say — counts in the row before it, except a pool, which
counts in the row after it (Table 1 lists the max pool under conv2_x). The model is built on PyTorch's
``meta`` device, which computes shapes without memory or arithmetic, so even ResNet-152 at 224 px is
counted in a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.models import MODELS, ResNet, build, check_name, is_external, native_image_size, stage_paths
from cnnlab.models.anatomy import is_pooling

__all__ = ["catalog", "format_table", "summarize"]

MAX_EXPANDED = 24  # a top-level sequence of at most this many blocks is shown block by block


def _side(value: int | tuple[int, ...]) -> int:
    # Every layer here is square; kernel_size, stride and padding may be an int or a pair.
    return value[0] if isinstance(value, tuple) else value


def _rows(model: nn.Module) -> list[tuple[str, str]]:
    """(row name, module path) in order: the stages, else the top-level modules."""
    stages = stage_paths(model)
    if stages:
        return list(stages.items())
    rows = []
    for name, child in model.named_children():
        kids = [k for k, _ in child.named_children()]
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and 1 < len(kids) <= MAX_EXPANDED:
            rows += [(f"{name}.{k}", f"{name}.{k}") for k in kids]
        else:
            rows.append((name, name))
    return rows


def _assign(model: nn.Module, rows: list[tuple[str, str]]) -> dict[str, str]:
    """Top-level module name → row, for the top-level modules that no row covers."""
    tops = [name for name, _ in model.named_children()]

    def top(path: str) -> str:
        return path.split(".", 1)[0]

    covered = {top(path) for _, path in rows}
    first_row_at = {}
    for row, path in rows:
        first_row_at.setdefault(tops.index(top(path)), row)
    extra = {}
    for i, name in enumerate(tops):
        if name in covered:
            continue
        after = [first_row_at[j] for j in sorted(first_row_at) if j > i]
        before = [first_row_at[j] for j in sorted(first_row_at) if j < i]
        # Rows of the same top-level module: the last of them is the one "before".
        before_rows = [row for row, path in rows if tops.index(top(path)) < i]
        if is_pooling(model.get_submodule(name)) and after:
            extra[name] = after[0]
        elif before_rows:
            extra[name] = before_rows[-1]
        else:
            extra[name] = (after or before or [rows[0][0]])[0]
    return extra


def _row_of(path: str, rows: list[tuple[str, str]], extra: dict[str, str]) -> str | None:
    """The row module ``path`` counts in; None for a container of rows (``features`` of ``features.0``…)."""
    best = None
    for row, row_path in rows:
        if path == row_path or path.startswith(row_path + "."):
            if best is None or len(row_path) > len(best[1]):
                best = (row, row_path)
    if best:
        return best[0]
    if any(row_path.startswith(path + ".") for _, row_path in rows):
        return None
    return extra[path.split(".", 1)[0]]


def _conv_text(conv: nn.Conv2d, with_stride: bool = True) -> str:
    k = _side(conv.kernel_size)
    text = f"{k}×{k}, {conv.out_channels}"
    if conv.groups > 1:
        text += ", depthwise" if conv.groups == conv.in_channels else f", {conv.groups} groups"
    stride = _side(conv.stride)
    return f"{text}, stride {stride}" if with_stride and stride > 1 else text


def _pool_text(m: nn.Module) -> str | None:
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _side(m.kernel_size), _side(m.stride)
        return f"{k}×{k} {'max' if isinstance(m, nn.MaxPool2d) else 'average'} pool, stride {s}"
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        side = _side(m.output_size)
        kind = "average" if isinstance(m, nn.AdaptiveAvgPool2d) else "max"
        return f"global {kind} pool" if side == 1 else f"adaptive {kind} pool to {side}×{side}"
    if "pool" in type(m).__name__.lower() and not any(True for _ in m.children()):
        return type(m).__name__
    return None


def _grouped(texts: list[str]) -> str:
    """'a; a; b' → '[a] × 2; b'."""
    parts, i = [], 0
    while i < len(texts):
        j = i
        while j < len(texts) and texts[j] == texts[i]:
            j += 1
        parts.append(f"[{texts[i]}] × {j - i}" if j - i > 1 else texts[i])
        i = j
    return "; ".join(parts)


def _describe(module: nn.Module) -> str:
    """Table 1's "layers" text of a row."""
    if isinstance(module, nn.Conv2d):
        return _conv_text(module)
    if isinstance(module, nn.Linear):
        return f"{module.out_features}-d fc"
    pool = _pool_text(module)
    if pool:
        return pool
    children = list(module.children())
    if children and all(hasattr(c, "left") for c in children):  # a stage of residual (or plain) blocks
        convs = [m for m in children[0].left if isinstance(m, nn.Conv2d)]
        return f"[{'; '.join(_conv_text(c, with_stride=False) for c in convs)}] × {len(children)}"
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    texts = []
    for m in leaves:
        if isinstance(m, nn.Conv2d):
            texts.append(_conv_text(m))
        elif isinstance(m, nn.Linear):
            texts.append(f"{m.out_features}-d fc")
        elif (pool := _pool_text(m)) is not None:
            texts.append(pool)
    if not texts:
        return type(module).__name__
    if len(texts) > 6:
        convs = sum(isinstance(m, nn.Conv2d) for m in leaves)
        return f"{type(module).__name__}: {convs} convolutions"
    return _grouped(texts)


def _resnet_texts(model: ResNet, texts: dict[str, str]) -> None:
    """Table 1's wording for the ResNets: the max pool heads conv2_x, wherever a variant runs it."""
    if isinstance(model.maxpool, nn.MaxPool2d):
        pool = _pool_text(model.maxpool)
        blocks = _describe(model.layer1)
        texts["conv2_x"] = f"{blocks}, then {pool} (pool runs after the blocks)" if model.pool_after_layer1 \
            else f"{pool}; {blocks}"


def _smallest_image(downsamplers: list[tuple[int, int, int]]) -> int:
    """Smallest square input for which every downsampling layer still has a map to shrink."""
    size = 1
    while True:
        side, ok = size, True
        for kernel, stride, padding in downsamplers:
            if side < stride:
                ok = False
                break
            side = (side + 2 * padding - kernel) // stride + 1
        if ok:
            return size
        size += 1


def _build(name: str, num_classes: int, width: int | None, in_channels: int, device: str) -> nn.Module:
    with torch.device(device):
        return build(name, num_classes=num_classes, width=width, in_channels=in_channels).eval()


def summarize(
    name: str,
    image_size: int | None = None,
    num_classes: int = 1000,
    width: int | None = None,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Describe model ``name`` row by row, as Table 1 of He et al. 2015 does.

    Returns a JSON-ready dict: ``model``, ``image_size``, ``num_classes``, ``width`` (None: the model's
    own), ``params``, ``macs`` and ``stages``, one entry per row (for the ResNets Table 1's conv1,
    conv2_x … conv5_x, pool, fc) with ``name``, ``output_size`` ([C, H, W]; [num_classes] for fc),
    ``layers``, ``params`` and ``macs``. Raises :class:`UserError` for an unknown model or an image too
    small for it.
    """
    check_name(name)
    size = native_image_size(name) if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}")
    if width is None and not is_external(name):
        width = MODELS[name].width
    try:
        model = _build(name, num_classes, width, in_channels, "meta")
        result = _count(model, name, size, in_channels, torch.device("meta"))
    except (NotImplementedError, RuntimeError, AssertionError):
        # An operation without a meta kernel: count on the CPU instead.
        model = _build(name, num_classes, width, in_channels, "cpu")
        try:
            result = _count(model, name, size, in_channels, torch.device("cpu"))
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"{name} cannot take {size} px inputs ({str(e).strip().splitlines()[0]}); its native "
                            f"size is {native_image_size(name)} px") from None
    return {"model": name, "image_size": size, "num_classes": num_classes, "width": width, **result}


class _Tally:
    """What one forward pass of one image records per Table 1 row, through hooks: multiply-accumulates,
    output sizes, and the chain of downsampling layers (to say which one leaves no map to shrink)."""

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self.macs = dict.fromkeys((row for row, _ in rows), 0)
        self.output_size: dict[str, list[int]] = {}
        self.downsamplers: list[tuple[str, int, int, int, int]] = []  # path, input side, kernel, stride, padding

    def count_macs(self, row: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_output = module.in_channels // module.groups * kh * kw
            else:
                per_output = module.in_features
            self.macs[row] += output.numel() * per_output  # batch of one

        return hook

    def record_downsampler(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            k, s, p = (_side(v) for v in (module.kernel_size, module.stride, module.padding))
            self.downsamplers.append((path, inputs[0].shape[-1], k, s, p))

        return hook

    def record_output(self, row: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
            # Hooks fire in execution order, so the last module of a row to run sets its size.
            if isinstance(output, Tensor):
                self.output_size[row] = list(output.shape[1:])

        return hook

    def attach(self, model: nn.Module, rows: list[tuple[str, str]], extra: dict[str, str]) -> list[Any]:
        """The hooks on every module of a row; returns their handles."""
        row_paths = {path: row for row, path in rows}
        handles = []
        for path, module in model.named_modules():
            row = _row_of(path, rows, extra) if path else None
            if row is None:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_hook(self.count_macs(row)))
            # A shortcut reads the same map as its block's first conv, so only the main path is a chain of
            # downsamplers.
            downsamples = isinstance(module, (nn.Conv2d, nn.MaxPool2d)) and _side(module.stride) > 1
            if downsamples and ".shortcut." not in path and ".downsample." not in path:
                handles.append(module.register_forward_pre_hook(self.record_downsampler(path)))
            if path in row_paths or ("." not in path and path in extra):
                handles.append(module.register_forward_hook(self.record_output(row_paths.get(path) or extra[path])))
        return handles


def _count(model: nn.Module, name: str, size: int, in_channels: int, device: torch.device) -> dict[str, Any]:
    rows = _rows(model)
    extra = _assign(model, rows)
    names = [row for row, _ in rows]
    tally = _Tally(rows)
    handles = tally.attach(model, rows, extra)
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size, device=device))
    except RuntimeError:
        _too_small(name, size, tally.downsamplers, rows, extra, complete=False)  # a layer with no map to shrink?
        raise
    finally:
        for handle in handles:
            handle.remove()
    _too_small(name, size, tally.downsamplers, rows, extra)

    params = dict.fromkeys(names, 0)
    for path, parameter in model.named_parameters():
        params[_row_of(path, rows, extra)] += parameter.numel()

    texts = {row: _describe(model.get_submodule(path)) for row, path in rows}
    if isinstance(model, ResNet):
        _resnet_texts(model, texts)
    stages = [{"name": row, "output_size": tally.output_size.get(row, []), "layers": texts[row],
               "params": params[row], "macs": tally.macs[row]} for row in names]
    return {"params": sum(params.values()), "macs": sum(tally.macs.values()), "stages": stages}


def _too_small(name: str, size: int, downsamplers: list[tuple[str, int, int, int, int]],
               rows: list[tuple[str, str]], extra: dict[str, str], complete: bool = True) -> None:
    """Padding keeps the forward from failing on tiny inputs, but a stride-2 layer fed a single pixel only
    samples padding: the deeper stages would describe nothing of the image. Say so, with the smallest size
    that works when the whole forward pass ran (``complete``), else with the model's own size."""
    for path, side, _, stride, _ in downsamplers:
        if side < stride:
            native = native_image_size(name)
            smallest = _smallest_image([d[2:] for d in downsamplers]) if complete else None
            advice = f"use at least {smallest} px (the model's native size is {native})" if smallest \
                else f"use a larger image, such as the model's native size, {native} px"
            raise UserError(f"image size {size} is too small for {name}: {_row_of(path, rows, extra)} ({path}) "
                            f"would downsample a {side}×{side} map; {advice}")


def catalog(num_classes: int = 10) -> list[dict[str, Any]]:
    """Every model of the registry at its native size and width: name, family, image_size, width, params,
    macs, about."""
    out = []
    for name, info in MODELS.items():
        s = summarize(name, num_classes=num_classes)
        out.append({"name": name, "family": info.family, "image_size": s["image_size"], "width": info.width,
                    "params": s["params"], "macs": s["macs"], "about": info.about})
    return out


def _short(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_table(summary: dict[str, Any]) -> str:
    """Render a :func:`summarize` result as a fixed-width table for the terminal."""
    header = ("stage", "output size", "layers", "params", "MACs")
    rows = [
        (
            stage["name"],
            "×".join(str(d) for d in stage["output_size"]),
            stage["layers"],
            f"{stage['params']:,}",
            f"{stage['macs']:,}",
        )
        for stage in summary["stages"]
    ]
    total = ("total", "", "", f"{summary['params']:,}", f"{summary['macs']:,}")
    widths = [max(len(row[i]) for row in [header, *rows, total]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [cell.ljust(w) for cell, w in zip(row[:3], widths[:3])]
        right = [cell.rjust(w) for cell, w in zip(row[3:], widths[3:])]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    width = "" if summary["width"] is None else f", width {summary['width']}"
    title = (
        f"{summary['model']} at {summary['image_size']}×{summary['image_size']} px, "
        f"{summary['num_classes']} classes{width}: "
        f"{_short(summary['params'])} params, {_short(summary['macs'])} MACs"
    )
    return "\n".join([title, "", line(header), rule, *map(line, rows), rule, line(total)])


def format_catalog(entries: list[dict[str, Any]]) -> str:
    """The ``cnnlab models`` table."""
    header = ("model", "input", "width", "params", "MACs", "what it is")
    rows = [(e["name"], f"{e['image_size']} px", str(e["width"]), _short(e["params"]), _short(e["macs"]), e["about"])
            for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in (1, 2, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])
