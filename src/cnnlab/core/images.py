"""The one image decoder: training data, ``predict``, ``visualize`` and the report read pixels here.

Every image becomes 8-bit RGB, or 8-bit grayscale for one-channel data, the same way wherever it
comes from: EXIF rotation applied; palette, CMYK and alpha images converted as PIL does (alpha
dropped); 16-bit and float grayscale rescaled rather than clipped to white.

Images stored in a dataset cache at a fixed size (``fit``) are decoded by PIL and resized by
torch's antialiased bilinear kernel for uint8 pixels, which is vectorised where PIL's resize is
not: on a 2-core AVX2 CPU, 256 px JPEGs became 224 px arrays at 750 images/s a thread with PIL's
resize and 1,055/s with torch's. torchvision.io's JPEG decoder made 1,395/s with pixels identical
to PIL's, but torchvision deprecated its decoders in 0.29 (BENCHMARKS.md, "Data beyond the memory").
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

GRAY_MODES = frozenset({"L", "1", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF values that swap width and height
# What PIL raises for files that are not images, or broken ones.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Source = bytes | str | Path


def _open(source: Source) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def header(source: Source) -> tuple[str, int, int]:
    """Mode, width and height (after EXIF rotation) from the header, without decoding pixels."""
    with _open(source) as img:
        width, height = img.size
        if img.getexif().get(EXIF_ORIENTATION, 1) in ROTATED_ORIENTATIONS:
            width, height = height, width
        return img.mode, width, height


def decode(source: Source, channels: int, *, fit: tuple[int, int] | None = None,
           max_side: int | None = None) -> np.ndarray:
    """uint8 (C, H, W) pixels of one image (bytes or a file path), with ``channels`` 1 or 3.

    ``fit``: crop to that aspect ratio around the centre and resize to (width, height), antialiased
    (how a dataset is stored in the cache when its images are not all of the stored size).
    ``max_side``: crop to the centred square, shrunk with PIL (antialiased) when larger than
    ``max_side``, so that the final bilinear resize to the network's size does not alias (how a
    single file is read for ``predict`` and ``visualize``). Neither: as is.

    Raises ``ValueError`` saying what is wrong (not an image, truncated, too large to decode safely);
    the caller names the file.
    """
    arr = _pixels(source, channels, max_side if fit is None else None)
    if fit is not None:
        return _fit(arr, fit)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _pixels(source: Source, channels: int, max_side: int | None) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 pixels as PIL hands them over."""
    try:
        with _open(source) as img:
            img.load()
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            img = to_gray(img) if channels == 1 else to_rgb(img)
            if max_side is not None:
                img = _centre_square(img, max_side)
            arr = np.asarray(img)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError("no such file") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"cannot decode the image ({e})") from None
    return arr


def _fit(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) pixels of (H, W[, C]) ones cropped to the aspect ratio of ``size`` (width, height)
    around the centre, then resized to it."""
    width, height = size
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    h, w, _ = arr.shape
    if w * height >= h * width:  # wider than the target: keep the full height
        crop_h, crop_w = h, max(1, min(w, round(h * width / height)))
    else:
        crop_h, crop_w = max(1, min(h, round(w * height / width))), w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    arr = arr[top:top + crop_h, left:left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.uint8)
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = arr.copy()
    # (H, W, C) memory seen as (1, C, H, W) is channels-last: the layout torch's vectorised uint8 kernel takes.
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    out = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].numpy())


def _centre_square(img: Image.Image, max_side: int) -> Image.Image:
    width, height = img.size
    side = min(width, height)
    if side < 1:
        raise ValueError("the image is empty")
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side > max_side:
        return img.resize((max_side, max_side), Image.Resampling.BILINEAR, box=box)
    return img.crop(box) if (width, height) != (side, side) else img


def to_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale, rescaling wide integer and float images instead of letting PIL clip them."""
    if img.mode == "L":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range onto 8 bits
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # floats in [0, 1]
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.convert("L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: wide grayscale rescaled first; a palette's transparency dropped as PIL asks."""
    if img.mode in GRAY_MODES and img.mode not in ("L", "1"):
        img = to_gray(img)  # PIL would clip 16-bit and float values to white
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def formats() -> list[str]:
    """The common image formats PIL reads here, for messages."""
    Image.init()
    return sorted({ext.lstrip(".").upper() for ext in Image.registered_extensions()
                   if ext in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")})
