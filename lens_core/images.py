"""Init-image reading for img2img: any file PIL reads, any PIL mode, bounded before decoding.

``open_image`` reads only the header (size, mode) and refuses non-images and oversized images before any pixel
is decoded; ``to_rgb`` maps every PIL mode to 8-bit RGB by its meaning rather than by PIL's default conversion
(which clips a 16-bit grayscale PNG, mode ``I;16`` / ``I``, to white):

- 16-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit PNG/TIFF grayscale) are scaled by
  255/65535; ``I`` (32-bit integer) likewise, unless all its values fit 0 … 255 (8-bit data converted to ``I``,
  kept as is); ``I`` values outside 0 … 65535 are refused;
- ``F`` (32-bit float) is taken as 0 … 1 when its maximum is ≤ 1, else as 0 … 255, and clipped;
- modes with transparency (``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``, ``P`` with a transparent colour) are
  composited over white;
- everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` …) through PIL's own
  conversion to RGB; EXIF orientation is applied.

``mask_values`` reads an inpainting mask (1 = regenerate) the way ComfyUI's LoadImage does where the file has
transparency, and by brightness otherwise:

- a mask with an alpha channel (``RGBA``, ``LA``, ``PA``, or ``P`` with a transparent colour) whose alpha is not
  fully opaque: **1 − alpha** (ComfyUI's LoadImage MASK output: transparent = regenerate; what ComfyUI's mask
  editor saves), with a warning saying so;
- otherwise its brightness: 8/16-bit grayscale, palette, RGB (an opaque alpha carries nothing);
  ``F`` (float) masks must already hold values in [0, 1];
- EXIF orientation is applied first, as for the image.
"""
from __future__ import annotations

import os

import numpy as np

import warnings

from .checks import missing_path
from .config import MAX_INIT_IMAGE_PIXELS, check_pixels

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16LS")


def open_image(path, what: str = "image"):
    """The PIL image at ``path`` with only its header read; OSError/ValueError naming ``what`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    p = os.fspath(path)
    if not os.path.exists(p):
        raise missing_path(p, what, "pass an existing PNG/JPEG/WebP/TIFF image", thing="file")
    if os.path.isdir(p):
        raise IsADirectoryError(f"{what} {p}: expected an image file, found a folder")
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        with open(p, "rb") as f:
            head = f.read(16)
        raise ValueError(f"{what} {p}: expected an image file (PNG, JPEG, WebP, TIFF, BMP …), found "
                         f"{os.path.getsize(p)} bytes that are not an image (starting with {head!r}); fix: pass an "
                         f"image file") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what} {p}: {exc}; fix: pass an image of at most {MAX_INIT_IMAGE_PIXELS / 1e6:.0f} MP"
                         ) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} {p}: expected a non-empty image, found {w}×{h} pixels")
    check_pixels(h, w, f"{what} {p}", MAX_INIT_IMAGE_PIXELS)
    return img


def to_rgb(img, what: str = "image"):
    """An 8-bit RGB PIL image with the same look as ``img`` whatever its mode (see the module docstring)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode == "RGB":
            return img
        if mode in _SIXTEEN_BIT or mode == "I":
            a = np.asarray(img.convert("I") if mode != "I" else img, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ValueError(f"{what}: a 32-bit integer image (mode I) with values {a.min()} … {a.max()}; "
                                 f"expected 16-bit values 0 … 65535; fix: save it as an 8- or 16-bit image")
            # 16-bit data; a mode-I image whose values all fit 0 … 255 holds 8-bit data (e.g. L converted to I)
            eight_bit = mode == "I" and (not a.size or a.max() <= 255)
            g = (a if eight_bit else np.round(a * (255.0 / 65535.0))).astype(np.uint8)
            return Image.fromarray(g, "L").convert("RGB")
        if mode == "F":
            a = np.asarray(img, dtype=np.float64)
            if a.size and not np.isfinite(a).all():
                raise ValueError(f"{what}: a float image (mode F) with NaN/inf pixels; fix: save it as an 8- or "
                                 f"16-bit image")
            scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
            g = np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
            return Image.fromarray(g, "L").convert("RGB")
        if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = (img.convert("LA") if mode == "La" else img).convert("RGBA")   # PIL has no La → RGBA
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        try:
            return img.convert("RGB")
        except ValueError as exc:       # a mode PIL cannot map to RGB (e.g. LAB without a colour profile)
            raise ValueError(f"{what}: cannot convert an image of PIL mode {mode} to RGB ({exc}); fix: save it as "
                             f"an RGB PNG or JPEG") from None
    except OSError as exc:              # truncated / corrupt pixel data
        raise OSError(f"{what}: the image data cannot be decoded ({exc}); fix: re-save or re-download the image"
                      ) from None


def to_tensor(img):
    """RGB PIL image → float tensor [1, 3, H, W] in [−1, 1]."""
    import torch

    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    return x.float() / 127.5 - 1.0


def has_alpha(img) -> bool:
    """Whether ``img`` carries transparency ComfyUI's LoadImage would read as a mask (an ``A`` band; also a
    palette image with a transparent colour)."""
    return "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)


def mask_values(img, name: str = "mask"):
    """An inpainting mask as a float32 array [H, W] in [0, 1] (1 = regenerate), see the module docstring."""
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img)
        if has_alpha(img):
            alpha = np.asarray((img if "A" in img.getbands() else img.convert("RGBA")).getchannel("A"),
                               dtype=np.float32) / 255.0
            if alpha.size and alpha.min() < 1.0:
                warnings.warn(f"{name}: the mask has transparency, so its alpha channel is the mask, as in ComfyUI's "
                              f"LoadImage: transparent pixels are regenerated, opaque ones kept (its colours are "
                              f"ignored); save a grayscale mask (white = regenerate) to use brightness instead",
                              UserWarning, stacklevel=3)
                return 1.0 - alpha
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            return np.asarray(img, dtype=np.float32) / 65535.0
        if img.mode == "I":
            arr = np.asarray(img, dtype=np.float64)
            return (arr / (65535.0 if arr.max(initial=0) > 255 else 255.0)).astype(np.float32)
        if img.mode == "F":
            return np.asarray(img, dtype=np.float32)
        if has_alpha(img) or img.mode in ("La", "RGBa"):     # fully opaque alpha: brightness of the colours
            img = img.convert("RGBA").convert("RGB") if img.mode != "LA" else img.convert("L")
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise OSError(f"{name}: the image data cannot be decoded ({exc}); fix: re-save the mask") from None


def check_image_range(t, name: str, low: float, high: float, fix: str, slack: float = 1e-3):
    """ValueError unless the float tensor ``t`` holds values in [low, high] (``slack`` of rounding allowed, and
    clamped); returns ``t`` clamped to the range. NaN/inf must have been refused before."""
    if t.numel() == 0:
        return t
    lo_, hi = (float(v) for v in (t.min(), t.max()))
    if lo_ < low - slack or hi > high + slack:
        guess = ""
        if hi > 2.0 and lo_ >= low - slack:
            guess = " (it looks like 0 … 255 pixel values)"
        raise ValueError(f"{name}: expected values in [{low:g}, {high:g}], found [{lo_:.4g}, {hi:.4g}]{guess}; "
                         f"fix: {fix}")
    return t.clamp(low, high) if lo_ < low or hi > high else t
