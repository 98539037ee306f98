"""Decode and geometrically normalise images once, before they are cached.

Only resize + centre crop happen here (uint8 stays 4x smaller in the cache than float32);
ImageNet normalisation and the gray -> 3-channel copy run on the device in ``normalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from qtl.data.records import DataError

if TYPE_CHECKING:
    import jax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch a >8-bit image to 0..255 by its own min/max.

    16-bit radiograph PNGs often hold 10-12 significant bits, so a fixed /257 would
    leave them nearly black; a per-image window keeps their contrast.
    """
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_gray(path: Path) -> np.ndarray:
    """An image file as 2-D uint8 grayscale, whatever its PNG/JPEG mode."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img)
                return _to_uint8(arr) if arr.dtype != np.uint8 else arr.copy()
            if img.mode != "L":
                img = img.convert("L")  # RGB(A)/P/1: ITU-R 601 luma, alpha ignored
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def preprocess(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Shortest side to ``resize`` (bilinear, antialiased), then a centre ``crop`` square.

    Same geometry as torchvision's Resize(resize) + CenterCrop(crop) used by the study.
    """
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}")
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than resize {resize}")
    h, w = img.shape
    if h <= w:
        size = (max(resize, int(resize * w / h)), resize)  # PIL sizes are (width, height)
    else:
        size = (resize, max(resize, int(resize * h / w)))
    pil = Image.fromarray(img)
    if pil.size != size:
        pil = pil.resize(size, Image.Resampling.BILINEAR)  # PIL's resize is antialiased
    out = np.asarray(pil)
    top = int(round((out.shape[0] - crop) / 2.0))
    left = int(round((out.shape[1] - crop) / 2.0))
    return np.ascontiguousarray(out[top : top + crop, left : left + crop])


def normalize(images_uint8: jax.Array) -> jax.Array:
    """(B, H, W) uint8 -> (B, H, W, 3) float32, ImageNet mean/std per channel (jittable)."""
    import jax.numpy as jnp

    x = images_uint8.astype(jnp.float32)[..., None] / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, dtype=jnp.float32)
    std = jnp.asarray(IMAGENET_STD, dtype=jnp.float32)
    return (x - mean) / std
