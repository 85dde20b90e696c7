"""Table 1 of He et al. 2015 for a built model, with parameters and MACs counted, not quoted.

The numbers come from the model itself: parameters are summed over the modules of each stage
and multiply-accumulates are counted by forward hooks on every ``Conv2d`` and ``Linear`` during
one forward pass of a zero image. A model whose layout drifts from the paper therefore shows the
drift (``resnet18-seed`` costs about 3.2 GMACs at 224 px against the paper's 1.8).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.core.errors import UserError
from cnnlab.models import NATIVE_IMAGE_SIZE, TABLE1_LAYERS, ResNet, build

__all__ = ["format_table", "summarize"]

STAGES: tuple[str, ...] = tuple(TABLE1_LAYERS)

# Table 1 lists the max pool under conv2_x, wherever a variant happens to run it.
_STAGE_OF_MODULE: dict[str, str] = {module: stage for stage, module in TABLE1_LAYERS.items()}
_STAGE_OF_MODULE["maxpool"] = "conv2_x"


def _side(value: int | tuple[int, ...]) -> int:
    # Every layer here is square; kernel_size, stride and padding may be an int or a pair.
    return value[0] if isinstance(value, tuple) else value


def _stage_of(path: str) -> str:
    return _STAGE_OF_MODULE[path.split(".", 1)[0]]


def _conv_text(conv: nn.Conv2d, with_stride: bool = True) -> str:
    k = _side(conv.kernel_size)
    text = f"{k}×{k}, {conv.out_channels}"
    return f"{text}, stride {_side(conv.stride)}" if with_stride else text


def _stage_text(stage: nn.Sequential) -> str:
    convs = [m for m in stage[0].left if isinstance(m, nn.Conv2d)]
    return f"[{'; '.join(_conv_text(c, with_stride=False) for c in convs)}] × {len(stage)}"


def _layer_texts(model: ResNet) -> dict[str, str]:
    conv2_x = _stage_text(model.layer1)
    if isinstance(model.maxpool, nn.MaxPool2d):
        k, s = _side(model.maxpool.kernel_size), _side(model.maxpool.stride)
        pool = f"{k}×{k} max pool, stride {s}"
        if model.pool_after_layer1:
            conv2_x = f"{conv2_x}, then {pool} (pool runs after the blocks)"
        else:
            conv2_x = f"{pool}; {conv2_x}"
    return {
        "conv1": _conv_text(model.conv1[0]),
        "conv2_x": conv2_x,
        "conv3_x": _stage_text(model.layer2),
        "conv4_x": _stage_text(model.layer3),
        "conv5_x": _stage_text(model.layer4),
        "pool": "global average pool",
        "fc": f"{model.fc.out_features}-d fc",
    }


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


def summarize(
    name: str,
    image_size: int | None = None,
    num_classes: int = 1000,
    width: int = 64,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Describe model ``name`` stage by stage, as Table 1 of He et al. 2015 does.

    Returns a JSON-ready dict: ``model``, ``image_size``, ``num_classes``, ``width``, ``params``,
    ``macs`` and ``stages``, one entry per Table 1 row (conv1, conv2_x … conv5_x, pool, fc) with
    ``name``, ``output_size`` ([C, H, W]; [num_classes] for fc), ``layers``, ``params`` and
    ``macs``. Raises :class:`UserError` for an unknown model or an image too small for it.
    """
    model = build(name, num_classes=num_classes, width=width, in_channels=in_channels)
    size = NATIVE_IMAGE_SIZE[name] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}")
    assert isinstance(model, ResNet)
    model.eval()

    macs = dict.fromkeys(STAGES, 0)
    output_size: dict[str, list[int]] = {}
    downsamplers: list[tuple[str, int, int, int, int]] = []  # path, input side, kernel, stride, padding

    def count_macs(stage: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                k = _side(module.kernel_size)
                per_output = module.in_channels // module.groups * k * k
            else:
                per_output = module.in_features
            macs[stage] += output.numel() * per_output  # batch of one

        return hook

    def record_downsampler(path: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            k, s, p = (_side(v) for v in (module.kernel_size, module.stride, module.padding))
            downsamplers.append((path, inputs[0].shape[-1], k, s, p))

        return hook

    def record_output(stage: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Hooks fire in execution order, so the last module of a stage to run sets its size.
            output_size[stage] = list(output.shape[1:])

        return hook

    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(count_macs(_stage_of(path))))
        # A projection shortcut reads the same map as its block's first conv, so only the main
        # path is a chain of downsamplers.
        downsamples = isinstance(module, (nn.Conv2d, nn.MaxPool2d)) and _side(module.stride) > 1
        if downsamples and ".shortcut." not in path:
            handles.append(module.register_forward_pre_hook(record_downsampler(path)))
        if "." not in path:
            handles.append(module.register_forward_hook(record_output(_stage_of(path))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
    finally:
        for handle in handles:
            handle.remove()

    # Padding keeps the forward from failing on tiny inputs, but a stride-2 layer fed a single
    # pixel only samples padding: the deeper stages would describe nothing of the image.
    for path, side, _, stride, _ in downsamplers:
        if side < stride:
            smallest = _smallest_image([d[2:] for d in downsamplers])
            raise UserError(
                f"image size {size} is too small for {name}: {_stage_of(path)} ({path}) would downsample a {side}×{side} map; "
                f"use at least {smallest} px (the model's native size is {NATIVE_IMAGE_SIZE[name]})"
            )

    params = dict.fromkeys(STAGES, 0)
    for path, parameter in model.named_parameters():
        params[_stage_of(path)] += parameter.numel()

    layers = _layer_texts(model)
    return {
        "model": name,
        "image_size": size,
        "num_classes": num_classes,
        "width": width,
        "params": sum(params.values()),
        "macs": sum(macs.values()),
        "stages": [
            {
                "name": stage,
                "output_size": output_size[stage],
                "layers": layers[stage],
                "params": params[stage],
                "macs": macs[stage],
            }
            for stage in STAGES
        ],
    }


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
    title = (
        f"{summary['model']} at {summary['image_size']}×{summary['image_size']} px, "
        f"{summary['num_classes']} classes, width {summary['width']}: "
        f"{_short(summary['params'])} params, {_short(summary['macs'])} MACs"
    )
    return "\n".join([title, "", line(header), rule, *map(line, rows), rule, line(total)])
