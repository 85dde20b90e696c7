"""Top-k labels with probabilities for image files and folders, preprocessed exactly as in training.

Each file is decoded with PIL to uint8 pixels the way the dataset sources decode them (RGB, or 8-bit
grayscale for one-channel models), cropped to a centred square, and then resized and normalised by
``cnnlab.data.transforms.to_input`` — the same bilinear resize and normalisation the trainer and
``evaluate`` apply. A 32×32 CIFAR image therefore gets exactly the prediction ``evaluate`` gives it.

A file that cannot be read as an image does not stop the others: its entry carries an ``error``
instead of ``top``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cnnlab.data.sources import _EXIF_ORIENTATION, _GRAY_MODES, MAX_FIT_SIDE, _as_gray
from cnnlab.data.transforms import to_input
from cnnlab.errors import UserError
from cnnlab.evaluate import logits

BATCH_SIZE = 64


def predict(path: str | Path, inputs: str | Path | Sequence[str | Path], top_k: int = 5,
            device: str = "auto", batch_size: int = BATCH_SIZE, tta: bool | None = None) -> list[dict[str, Any]]:
    """Predict every image in ``inputs`` (files, or folders searched recursively) with a run or checkpoint.

    ``tta``: average each image's logits with its mirror image's before the softmax; by default as the
    run scored itself, so that predictions agree with ``cnnlab evaluate``'s.

    Returns one dict per file, in order: ``{"image": path, "top": [{"label", "prob"}, …]}`` with the
    ``top_k`` most probable classes, or ``{"image": path, "error": reason}`` for a file that is not a
    readable image.
    """
    from cnnlab import run
    from cnnlab.train.device import pick_device

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    files = list(expand(inputs))
    if not files:
        raise UserError("no image files given; name image files or folders that hold them")
    loaded = run.load(path, device=pick_device(device))
    dev = next(loaded.model.parameters()).device
    size, channels = loaded.spec["image_size"], loaded.spec.get("in_channels", 3)
    k = min(top_k, len(loaded.classes))
    tta = loaded.tta if tta is None else tta

    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        entries: list[dict[str, Any]] = []
        batch: list[torch.Tensor] = []
        for file, problem in chunk:
            entry: dict[str, Any] = {"image": str(file)}
            if problem is None:
                try:
                    pixels = load_image(file, channels, size)
                except ValueError as e:
                    problem = str(e)
                else:
                    batch.append(to_input(pixels[None].to(dev), size, loaded.mean, loaded.std))
            if problem is not None:
                entry["error"] = problem
            entries.append(entry)
        if batch:
            with torch.no_grad():
                probs = torch.softmax(logits(loaded.model, torch.cat(batch), tta), dim=1)
            values, indices = probs.topk(k, dim=1)
            good = iter(e for e in entries if "error" not in e)
            for entry, vals, idxs in zip(good, values.tolist(), indices.tolist()):
                entry["top"] = [{"label": loaded.classes[i], "prob": v} for v, i in zip(vals, idxs)]
        results.extend(entries)
    return results


def expand(inputs: str | Path | Sequence[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """(file, problem) pairs: files as given, folders walked recursively in sorted order.

    Every non-hidden file in a folder is tried (a stray text file is reported, not silently skipped);
    a path that does not exist, or a folder with no files, comes back with its problem.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = False
            for folder, subdirs, names in os.walk(item):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        found = True
                        yield Path(folder, name), None
            if not found:
                yield item, "the folder holds no files"
        elif item.exists():
            yield item, None
        else:
            yield item, "no such file or folder"


def load_image(path: str | Path, channels: int, image_size: int) -> torch.Tensor:
    """uint8 (C, H, W) pixels of one image file, ready for ``to_input``; ValueError names what is wrong.

    Any mode PIL reads becomes 8-bit RGB (palette, CMYK, RGBA with the alpha dropped as the dataset
    decoder does, 16-bit and float grayscale rescaled rather than clipped) or, for one-channel models,
    8-bit grayscale. EXIF rotation is applied. A non-square image is cropped to its centred square, as
    mixed-size training folders are; a very large one is first shrunk with PIL (antialiased) to
    ``max(256, image_size)`` so that the final bilinear resize does not alias.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            img = _as_gray(img) if channels == 1 else _as_rgb(img)
            width, height = img.size
            side = min(width, height)
            if side < 1:
                raise ValueError("the image is empty")
            left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
            limit = max(MAX_FIT_SIDE, image_size)
            if side > limit:
                img = img.resize((limit, limit), Image.Resampling.BILINEAR, box=box)
            elif side != width or side != height:
                img = img.crop(box)
            arr = np.asarray(img)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"cannot decode the image ({e})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _GRAY_MODES and img.mode not in ("L", "1"):
        img = _as_gray(img)  # PIL would clip 16-bit and float values to white
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
    return img if img.mode == "RGB" else img.convert("RGB")
