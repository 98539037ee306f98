"""Training augmentation: horizontal flip with probability p, bilinear rotation in +-max degrees.

One definition, two implementations. :func:`draw` turns a batch key into per-image flips and
angles; :func:`augment` applies them on the device (dm-pix inside the jitted step, the right
place on a GPU) and :func:`augment_host` applies the very same draws with OpenCV in the loader
threads (on a 2-core CPU dm-pix's rotation does ~20-150 img/s, PIL's bilinear affine ~1,000
per core, OpenCV's ~5,000). Both map output pixel centres to input pixel centres with the
same matrix, so they agree except where a sample reaches past the border and in the host
result's rounding to uint8 (tested).
The randomness comes only from the key the batch stream hands out, so two heads trained with
the same seed see identical augmented images on either path.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from functools import partial

import cv2
import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from qtl.config import AugmentOn, DataConfig

cv2.setNumThreads(1)  # the loader's thread pool parallelises across images


@partial(jax.jit, static_argnums=1, static_argnames=("hflip_p", "max_rotation_deg"))
def draw(
    key: jax.Array, n: int, *, hflip_p: float = 0.5, max_rotation_deg: float = 15.0
) -> tuple[jax.Array, jax.Array]:
    """Per-image (flip?, angle in degrees) for a batch of ``n`` from the batch key."""
    keys = jax.random.split(key, n)

    def one(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_flip, k_rot = jax.random.split(k)
        flip = jax.random.bernoulli(k_flip, hflip_p)
        deg = jax.random.uniform(k_rot, (), minval=-max_rotation_deg, maxval=max_rotation_deg)
        return flip, deg

    return jax.vmap(one)(keys)


def augment(
    images: jax.Array, key: jax.Array, *, hflip_p: float = 0.5, max_rotation_deg: float = 15.0
) -> jax.Array:
    """Augment a (B, H, W) float batch on the device (jittable); each image its own draw."""
    flips, degrees = draw(key, images.shape[0], hflip_p=hflip_p, max_rotation_deg=max_rotation_deg)

    def one(image: jax.Array, flip: jax.Array, deg: jax.Array) -> jax.Array:
        image = jnp.where(flip, image[:, ::-1], image)[..., None]  # HWC for dm-pix
        if max_rotation_deg > 0:
            # dm-pix takes radians; the study's code passed degrees' numbers as radians.
            image = pix.rotate(image, jnp.deg2rad(deg), order=1, mode="constant", cval=0.0)
        return image[..., 0]

    return jax.vmap(one)(images, flips, degrees)


def _inverse_affine(h: int, w: int, flip: bool, deg: float) -> np.ndarray:
    """2x3 map from output (x, y) to input (x, y) pixel centres of flip-then-rotate.

    dm-pix samples input index (r, c) = R (r' - ctr_r, c' - ctr_c) + ctr with R = [[cos, sin],
    [-sin, cos]] and ctr = (size - 1) / 2; this is the same map in OpenCV's x/y order, with
    the flip c -> (w - 1) - c applied to the sampled input position.
    """
    cos, sin = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    m = np.array(
        [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]], np.float64
    )
    if flip:
        m[0] = -m[0]
        m[0, 2] += w - 1
    return m


def augment_one_host(image: np.ndarray, flip: bool, deg: float) -> np.ndarray:
    """One (H, W) uint8 image, flipped then rotated with bilinear sampling, zeros outside."""
    h, w = image.shape
    if deg == 0.0:
        return np.ascontiguousarray(image[:, ::-1]) if flip else image
    return cv2.warpAffine(
        image,
        _inverse_affine(h, w, flip, deg),
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def augment_host(
    images: np.ndarray,
    key: jax.Array,
    *,
    hflip_p: float = 0.5,
    max_rotation_deg: float = 15.0,
    pool: Executor | None = None,
    rows: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Augment a (B, H, W) uint8 batch on the host with the draws :func:`augment` would use.

    OpenCV releases the GIL while it resamples, so a thread ``pool`` scales with the cores.
    ``rows=(start, stop, batch_size)``: ``images`` are those rows of a batch of
    ``batch_size`` (one process's share), augmented with those rows' draws.
    """
    size = len(images) if rows is None else rows[2]
    flips, degrees = draw(key, size, hflip_p=hflip_p, max_rotation_deg=max_rotation_deg)
    flips, degrees = np.asarray(flips), np.asarray(degrees, dtype=np.float64)
    if rows is not None:
        flips, degrees = flips[rows[0] : rows[1]], degrees[rows[0] : rows[1]]
    if max_rotation_deg <= 0:
        degrees = np.zeros_like(degrees)
    out = np.empty_like(images)

    def work(positions: np.ndarray) -> None:
        for i in positions:
            out[i] = augment_one_host(images[i], bool(flips[i]), float(degrees[i]))

    if pool is None:
        work(np.arange(len(images)))
    else:  # a few chunks per thread: little scheduling overhead, still balanced
        list(pool.map(work, np.array_split(np.arange(len(images)), 8)))
    return out


def resolve_augment_on(data: DataConfig) -> AugmentOn:
    """``data.augment_on`` with ``auto`` decided for this machine: host threads on a CPU-only
    backend (OpenCV is ~50x faster there than dm-pix), the device on a GPU/TPU.

    The two implementations agree only to rounding and at the border, so the resolved value
    is part of a run's identity, recorded at its first start and kept on resume
    (qtl.record.identity).
    """
    if data.augment_on != AugmentOn.auto:
        return AugmentOn(data.augment_on)
    return AugmentOn.host if jax.default_backend() == "cpu" else AugmentOn.device


def placement(data: DataConfig) -> str | None:
    """Where training batches are augmented: "device", "host" or None (augmentation off)."""
    if not data.augment or (data.hflip_p <= 0 and data.max_rotation_deg <= 0):
        return None
    return resolve_augment_on(data).value
