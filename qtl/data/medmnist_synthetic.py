"""Synthetic MedMNIST: real-format ``{flag}[_{size}].npz`` files for any of the 12 2D sets.

Downloads are impossible here, so the demo and the tests run the *real* reader
(:mod:`qtl.data.medmnist`) on files this module writes: same keys, dtypes, shapes, channels,
task type and number of classes as the flag's INFO entry, split sizes reduced by default.
The images carry class structure that a small model can learn but not trivially (shapes,
textures and intensities that overlap between classes, smooth background, pixel noise):
- multi-class: one shape family per class (disk, ring, bars, cross...), its own tint, jittered
  position/size/angle;
- ordinal (RetinaMNIST): a fundus-like disc whose lesion count and brightness grow with the
  grade, so neighbouring grades overlap the way graded severity does;
- binary: a diffuse opacity present in the "finding" class only, of random strength;
- multi-label (ChestMNIST): each label independently present (prevalence falling from 25% to
  5% over the labels), shown as a blob at that label's place inside the lung fields.
Files are deterministic in (seed, flag, size, split) and written atomically (temp + rename),
so concurrent jobs can share a folder. A marker key (:data:`qtl.data.medmnist.SYNTHETIC_KEY`)
records the settings; real files never carry it.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qtl.data.medmnist_info import (
    FLAGS,
    SIZES,
    SPLITS,
    SYNTHETIC_KEY,
    FlagInfo,
    Task,
    flag_info,
    medmnist_path,
)
from qtl.utils.files import atomic_write_bytes

VERSION = 2  # bump when the images change, so cached files are rewritten
DEFAULT_SPLITS = {"train": 1000, "val": 200, "test": 400}  # capped by the official sizes
# the binary class that shows the finding (BreastMNIST's class 0 is "malignant")
_FINDING_CLASS = {"breastmnist": 0}
# per-class RGB tint of the multi-class shapes (cycled)
_TINTS = np.array(
    [
        [0.9, 0.3, 0.5],
        [0.4, 0.8, 0.3],
        [0.3, 0.4, 0.9],
        [0.9, 0.8, 0.2],
        [0.6, 0.3, 0.9],
        [0.2, 0.8, 0.8],
        [0.9, 0.5, 0.2],
        [0.7, 0.7, 0.7],
        [0.5, 0.9, 0.6],
        [0.8, 0.4, 0.8],
        [0.4, 0.6, 0.5],
    ],
    np.float32,
)


def split_sizes(flag: str, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """The sizes to write: ``sizes`` (default :data:`DEFAULT_SPLITS`) capped by the official."""
    info = flag_info(flag)
    asked = {**DEFAULT_SPLITS, **(sizes or {})}
    unknown = set(asked) - set(SPLITS)
    if unknown:
        raise ValueError(f"split sizes: unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    out = {}
    for split in SPLITS:
        n = int(asked[split])
        if n < 1:
            raise ValueError(f"split sizes: {split}={n}, expected >= 1")
        out[split] = min(n, info.splits[split])
    return out


def write_synthetic(
    root: Path | str,
    flag: str,
    size: int = 28,
    *,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    noise: float = 0.08,
) -> Path:
    """Write ``{root}/{flag}[_{size}].npz`` (always; see :func:`ensure_synthetic`)."""
    info = flag_info(flag)
    path = medmnist_path(root, flag, size)
    counts = split_sizes(flag, sizes)
    meta = {"version": VERSION, "seed": seed, "noise": noise, "splits": counts}
    arrays: dict[str, np.ndarray] = {SYNTHETIC_KEY: np.asarray(json.dumps(meta, sort_keys=True))}
    for index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, zlib.crc32(flag.encode()), size, index, VERSION])
        images, labels = _generate(info, size, counts[split], rng, noise)
        arrays[f"{split}_images"] = images[..., 0] if info.channels == 1 else images
        arrays[f"{split}_labels"] = labels
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def ensure_synthetic(
    root: Path | str,
    flag: str,
    size: int = 28,
    *,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    noise: float = 0.08,
) -> Path:
    """The synthetic file, written only when missing or made with other settings."""
    path = medmnist_path(root, flag, size)
    wanted = {"version": VERSION, "seed": seed, "noise": noise, "splits": split_sizes(flag, sizes)}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                if SYNTHETIC_KEY not in npz.files:
                    return path  # a real file: never overwrite it
                if json.loads(str(npz[SYNTHETIC_KEY])) == json.loads(json.dumps(wanted)):
                    return path
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # unreadable: rewrite
    return write_synthetic(root, flag, size, sizes=sizes, seed=seed, noise=noise)


# ----------------------------------------------------------------------------- images


def _generate(
    info: FlagInfo, size: int, n: int, rng: np.random.Generator, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, C) uint8 images and (n, L) uint8 labels."""
    k = info.n_classes
    if info.task == Task.multi_label:
        prevalence = np.linspace(0.25, 0.05, k)
        labels = (rng.uniform(size=(n, k)) < prevalence).astype(np.uint8)
    else:
        labels = rng.integers(0, k, size=(n, 1)).astype(np.uint8)
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    grid = (u.astype(np.float32), v.astype(np.float32))
    out = np.empty((n, size, size, info.channels), np.uint8)
    for i in range(n):
        if info.task == Task.multi_label:
            img = _chest(grid, labels[i], rng)
        elif info.task == Task.ordinal:
            img = _fundus(grid, int(labels[i, 0]), k, rng)
        elif info.task == Task.binary:
            finding = int(labels[i, 0]) == _FINDING_CLASS.get(info.flag, 1)
            img = _opacity(grid, finding, rng)
        else:
            img = _shape_class(grid, int(labels[i, 0]), rng)
        if info.channels == 1 and img.shape[-1] == 3:
            img = img.mean(-1, keepdims=True)
        elif info.channels == 3 and img.shape[-1] == 1:
            img = np.repeat(img, 3, -1)
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out, labels


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Zero-mean unit-ish noise low-passed to features ~``scale`` of the image wide."""
    h, w = shape
    spectrum = np.fft.rfft2(rng.normal(size=shape))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    sigma = 1.0 / (scale * max(h, w))
    spectrum *= np.exp(-(fx**2 + fy**2) / (2 * sigma**2))
    field = np.fft.irfft2(spectrum, s=shape)
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _soft(inside: np.ndarray, size: int) -> np.ndarray:
    """Signed-distance-like field -> soft mask with edges about a pixel wide."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside * size / 2.0, -30, 30)))


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    rho = np.sqrt(u**2 + v**2)
    disk = 1 - rho
    if kind == 0:  # disk
        f = disk
    elif kind == 1:  # ring
        f = np.minimum(disk, rho - 0.55)
    elif kind == 2:  # square
        f = 0.85 - np.maximum(np.abs(u), np.abs(v))
    elif kind == 3:  # cross
        f = np.maximum(
            np.minimum(0.3 - np.abs(u), 1 - np.abs(v)), np.minimum(0.3 - np.abs(v), 1 - np.abs(u))
        )
    elif kind == 4:  # horizontal bars in a disk
        f = np.minimum(disk, np.sin(3 * np.pi * v) * 0.3)
    elif kind == 5:  # vertical bars in a disk
        f = np.minimum(disk, np.sin(3 * np.pi * u) * 0.3)
    elif kind == 6:  # diamond
        f = 1 - np.abs(u) - np.abs(v)
    elif kind == 7:  # two dots
        d1 = np.sqrt((u - 0.5) ** 2 + v**2)
        d2 = np.sqrt((u + 0.5) ** 2 + v**2)
        f = 0.45 - np.minimum(d1, d2)
    elif kind == 8:  # triangle
        f = np.minimum(v + 0.6, 0.9 - 1.6 * np.abs(u) - v)
    elif kind == 9:  # flat ellipse
        f = 1 - np.sqrt(u**2 + (v / 0.45) ** 2)
    else:  # checkered disk
        f = np.minimum(disk, np.sin(2.5 * np.pi * u) * np.sin(2.5 * np.pi * v) * 0.3)
    return _soft(f, size)


def _shape_class(grid, label: int, rng: np.random.Generator) -> np.ndarray:
    u, v = grid
    size = u.shape[0]
    cx, cy = rng.uniform(-0.2, 0.2, 2)
    radius = 0.5 * rng.uniform(0.75, 1.25)
    angle = rng.uniform(-0.3, 0.3)
    ca, sa = np.cos(angle), np.sin(angle)
    du, dv = (u - cx) / radius, (v - cy) / radius
    mask = _shape_mask(label % 11, ca * du + sa * dv, -sa * du + ca * dv, size)
    tint = _TINTS[label % len(_TINTS)] * rng.uniform(0.7, 1.1)
    background = 0.3 + 0.08 * _smooth_noise(u.shape, rng, 0.15)
    base = np.stack([background * c for c in (0.9, 0.75, 0.8)], -1)
    amp = 0.3 + 0.15 * rng.uniform()
    return base + amp * mask[..., None] * tint


def _fundus(grid, grade: int, n_grades: int, rng: np.random.Generator) -> np.ndarray:
    u, v = grid
    size = u.shape[0]
    rho = np.sqrt(u**2 + v**2)
    field = _soft(0.92 - rho, size)
    texture = 0.05 * _smooth_noise(u.shape, rng, 0.1)
    tint = np.array([0.75, 0.35, 0.15], np.float32) * (1 - 0.06 * grade) * rng.uniform(0.85, 1.1)
    img = (field * (1 + texture))[..., None] * tint
    side = rng.choice([-1, 1])
    od = _soft(0.14 - np.sqrt((u - side * 0.45) ** 2 + (v - rng.uniform(-0.1, 0.1)) ** 2), size)
    img = img + 0.35 * od[..., None] * np.array([1.0, 0.9, 0.5], np.float32)
    severity = grade / max(1, n_grades - 1)
    count = rng.poisson(1.0 + 5.0 * severity)
    for _ in range(count):
        r = rng.uniform(0.0, 0.75)
        phi = rng.uniform(0, 2 * np.pi)
        px, py = r * np.cos(phi), r * np.sin(phi)
        spot = _soft(rng.uniform(0.04, 0.09) - np.sqrt((u - px) ** 2 + (v - py) ** 2), size)
        if rng.uniform() < 0.5:  # exudate: bright yellow
            colour = np.array([0.35, 0.35, 0.1], np.float32)
        else:  # haemorrhage: dark red
            colour = np.array([-0.25, -0.2, -0.1], np.float32)
        img = img + (0.5 + 0.5 * severity) * spot[..., None] * colour * field[..., None]
    return img


def _opacity(grid, finding: bool, rng: np.random.Generator) -> np.ndarray:
    u, v = grid
    size = u.shape[0]
    body = 0.55 + 0.05 * _smooth_noise(u.shape, rng, 0.2)
    lungs = _soft(1 - np.sqrt(((u - 0.45) / 0.35) ** 2 + (v / 0.7) ** 2), size) + _soft(
        1 - np.sqrt(((u + 0.45) / 0.35) ** 2 + (v / 0.7) ** 2), size
    )
    img = body - 0.3 * lungs
    if finding:
        cx, cy = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)
        width = rng.uniform(0.2, 0.4)
        cloud = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * width**2))
        cloud *= 1 + 0.5 * _smooth_noise(u.shape, rng, 0.08)
        img = img + rng.uniform(0.08, 0.3) * cloud
    return img[..., None]


def _chest(grid, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, v = grid
    size = u.shape[0]
    img = _opacity(grid, False, rng)[..., 0]
    n = len(labels)
    # label j's place: a point inside the lung fields, spread over both sides
    for j in np.flatnonzero(labels):
        side = 1 if j % 2 == 0 else -1
        px = side * (0.3 + 0.25 * ((j // 2) % 2))
        py = -0.55 + 1.1 * (j // 4) / max(1, (n - 1) // 4)
        px += rng.normal(0, 0.05)
        py += rng.normal(0, 0.05)
        blob = _soft(rng.uniform(0.14, 0.2) - np.sqrt((u - px) ** 2 + (v - py) ** 2), size)
        img = img + rng.uniform(0.2, 0.35) * blob
    return img[..., None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder to write the .npz files into")
    parser.add_argument("--flag", action="append", choices=FLAGS, help="repeatable; default all")
    parser.add_argument("--size", type=int, action="append", choices=SIZES, help="default 28")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=DEFAULT_SPLITS["train"])
    parser.add_argument("--val", type=int, default=DEFAULT_SPLITS["val"])
    parser.add_argument("--test", type=int, default=DEFAULT_SPLITS["test"])
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    for flag in args.flag or FLAGS:
        for size in args.size or [28]:
            path = ensure_synthetic(args.root, flag, size, sizes=sizes, seed=args.seed)
            print(path)


if __name__ == "__main__":
    main()
