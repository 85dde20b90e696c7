"""The one image decoder: training data, ``predict``, ``visualize`` and the report read pixels here.

Every image becomes 8-bit RGB, or 8-bit grayscale for one-channel data, the same way wherever it
comes from: EXIF rotation applied; palette, CMYK and alpha images converted as PIL does (alpha
dropped); 16-bit and float grayscale rescaled rather than clipped to white.

Images stored in a dataset cache at a fixed size (``fit``) are decoded by PIL and resized by
torch's antialiased bilinear kernel for uint8 pixels, which is vectorised where PIL's resize is
not: on a 2-core AVX2 CPU, 256 px JPEGs became 224 px arrays at 750 images/s a thread with PIL's
resize and 1,055/s with torch's. torchvision.io's JPEG decoder made 1,395/s with pixels identical
to PIL's, but torchvision deprecated its decoders in 0.29 (BENCHMARKS.md, "Data beyond the memory").

Memory is bounded from the header, before a pixel is decoded: width × height × the bytes PIL keeps
a pixel in may not exceed ``max_bytes`` (:data:`MAX_DECODED_BYTES` for training data and ``predict``,
:data:`UPLOAD_DECODED_BYTES` for the explorer's uploads), else :class:`TooLarge`. When only a given
size is needed (``fit``, ``max_side``), a large JPEG is decoded reduced (``Image.draft``) and any other
large image box-reduced right after decoding, keeping at least :data:`REDUCING_GAP` times the needed
size so that the final antialiased resize decides the pixels; 16-bit and float images are brought to
8 bits a band of rows at a time in integer or float32 arithmetic.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageMode

GRAY_MODES = frozenset({"L", "1", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF values that swap width and height
# What PIL raises for files that are not images, or broken ones.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Decoded pixels one image may take, as PIL holds them: 64 Mpx at 4 bytes (an 8192 × 8192 RGB photo, or a
# 16-bit scan of 11,585 px square) for training data and `predict`; the conversions after decoding take at
# most as much again. An upload to the explorer, which many people can send at once, gets a quarter of it.
MAX_DECODED_BYTES = 256 * 2**20
UPLOAD_DECODED_BYTES = 64 * 2**20
# Reduced decoding keeps at least this many times the needed size: Pillow's documentation finds the result of
# a reduction followed by a fair resize indistinguishable from the fair resize alone from a gap of 3 on.
REDUCING_GAP = 3
BAND_PIXELS = 2**20  # wide images are brought to 8 bits this many pixels at a time
# PIL's Image.reduce takes these modes, and converting them to 8-bit L or RGB commutes with a box average.
REDUCE_FIRST = frozenset({"L", "RGB"})
# Image.transpose for each EXIF orientation other than 1 (what ImageOps.exif_transpose does, for an image
# already reduced, which has no EXIF block of its own any more).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

Source = bytes | str | Path


class TooLarge(ValueError):
    """An image whose header promises more decoded pixels than the decoder's budget allows."""


def _open(source: Source) -> Image.Image:
    with warnings.catch_warnings():
        # PIL warns from 89 Mpx on; the budget below is checked right after opening, and refuses in one line.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def header(source: Source, max_bytes: int = MAX_DECODED_BYTES) -> tuple[str, int, int]:
    """Mode, width and height (after EXIF rotation) from the header, without decoding pixels (but a PNG, whose
    EXIF block may follow its pixels); :class:`TooLarge` first if they would take more than ``max_bytes``."""
    try:
        with _open(source) as img:
            _check_budget(img, max_bytes)
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in ROTATED_ORIENTATIONS:
                width, height = height, width
            return img.mode, width, height
    except Image.UnidentifiedImageError:  # its message repeats the file's path (or a BytesIO's repr)
        raise ValueError("not an image PIL can read") from None


def decode(source: Source, channels: int, *, fit: tuple[int, int] | None = None,
           max_side: int | None = None, max_bytes: int = MAX_DECODED_BYTES) -> np.ndarray:
    """uint8 (C, H, W) pixels of one image (bytes or a file path), with ``channels`` 1 or 3.

    ``fit``: crop to that aspect ratio around the centre and resize to (width, height), antialiased
    (how a dataset is stored in the cache when its images are not all of the stored size).
    ``max_side``: crop to the centred square, shrunk with PIL (antialiased) when larger than
    ``max_side``, so that the final bilinear resize to the network's size does not alias (how a
    single file is read for ``predict`` and ``visualize``). Neither: as is.
    ``max_bytes``: the most bytes the decoded pixels may take (see the module's notes).

    Raises ``ValueError`` saying what is wrong (not an image, truncated, too large to decode safely:
    :class:`TooLarge` when over ``max_bytes``); the caller names the file.
    """
    arr = _pixels(source, channels, fit, max_side if fit is None else None, max_bytes)
    if fit is not None:
        return _fit(arr, fit)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    # Owned and writable: torch.from_numpy warns about (and must not write into) PIL's read-only buffer.
    return np.require(arr, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def _pixels(source: Source, channels: int, fit: tuple[int, int] | None, max_side: int | None,
            max_bytes: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 pixels as PIL hands them over, reduced when far larger than needed."""
    try:
        with _open(source) as img:
            # Before the EXIF block is read: PIL decodes a PNG in full to look for one after the pixels.
            square = _needed(fit, max_side, square=True)
            if square is not None and _reduction(img.size, square) > 1:
                img.draft(img.mode, (square[0] * REDUCING_GAP, square[1] * REDUCING_GAP))  # JPEG only; else no-op
            _check_budget(img, max_bytes)
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            needed = _needed(fit, max_side, swap=orientation in ROTATED_ORIENTATIONS)
            img.load()
            if img.mode not in REDUCE_FIRST:
                img = to_gray(img) if channels == 1 else to_rgb(img)
            if needed is not None and _reduction(img.size, needed) > 1:
                img = img.reduce(_reduction(img.size, needed))
            if orientation in EXIF_TRANSPOSE:
                img = img.transpose(EXIF_TRANSPOSE[orientation])
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


def _needed(fit: tuple[int, int] | None, max_side: int | None, swap: bool = False,
            square: bool = False) -> tuple[int, int] | None:
    """The (width, height) the caller needs at least, in the file's own orientation (``swap``: it is rotated;
    ``square``: whichever it is); None: all of it."""
    if fit is not None:
        return (max(fit),) * 2 if square else (fit[1], fit[0]) if swap else fit
    return None if max_side is None else (max_side, max_side)


def _reduction(size: tuple[int, int], needed: tuple[int, int]) -> int:
    """The whole factor an image of ``size`` can shrink by and still hold REDUCING_GAP times ``needed``."""
    return max(1, min(size[0] // (needed[0] * REDUCING_GAP), size[1] // (needed[1] * REDUCING_GAP)))


def _check_budget(img: Image.Image, max_bytes: int) -> None:
    """``TooLarge`` if the pixels the header promises (after any reduced decoding) exceed ``max_bytes``."""
    mode = ImageMode.getmode(img.mode)
    # PIL keeps images of several 8-bit bands at 4 bytes a pixel, and one band at its own width.
    per_pixel = 4 if len(mode.bands) > 1 else np.dtype(mode.typestr).itemsize
    width, height = img.size
    need = width * height * per_pixel
    if need > max_bytes:
        raise TooLarge(f"it is {width:,}×{height:,} pixels ({img.mode}), {need / 2**20:,.0f} MiB decoded, more than "
                       f"the {max_bytes / 2**20:,.0f} MiB one image may take; shrink it (to "
                       f"{int((max_bytes / per_pixel) ** 0.5):,} px square or less) and try again")


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
        return _wide_to_gray(img)
    return img.convert("L")


def _wide_to_gray(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image onto 8 bits: the 16-bit range (and integers above 255) divided
    by 257, floats in [0, 1] times 255, rounded to the nearest and clipped. A band of rows at a time, so that
    no wide copy of the whole image is ever held."""
    width, height = img.size
    top = (img.getextrema()[1] if width and height else 0) or 0
    sixteen = img.mode.startswith("I;16") or (img.mode == "I" and top > 255)
    unit = img.mode == "F" and top <= 1.0
    out = np.empty((height, width), np.uint8)
    rows = max(1, BAND_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))))
        if sixteen:  # rint(v / 257) in integers: v / 257 is never halfway for a whole v, so no tie to break
            band = (band.astype(np.int64) + 128) // 257
        elif unit:
            band = np.rint(band * np.float32(255))
        elif img.mode == "F":
            band = np.rint(band)
        out[y:y + len(band)] = np.clip(band, 0, 255)
    return Image.fromarray(out)


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
