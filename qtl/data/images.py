"""One image file -> the uint8 array a trained model's preprocessing expects (mode=predict).

PNG and JPEG through Pillow, DICOM through pydicom when it is installed (the ``dicom`` extra).
The preprocessing is a plain dict (a run's or an export's ``preprocessing.json``):

- ``{"kind": "resize_crop", "resize": R, "crop": C, "color": "gray"}`` (the CXR study):
  grayscale, shortest side to R, centre crop C: uint8 (C, C), as the image cache stores it;
- ``{"kind": "resize", "size": S, "color": "gray" | "rgb"}`` (MedMNIST): the whole image
  resized to S x S (bicubic): uint8 (S, S, 1 or 3), as MedMNIST's arrays hold images.

Every failure is a :class:`DataError` naming the file, so a caller can list it and go on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qtl.data.preprocess import _to_uint8, load_gray, preprocess
from qtl.data.records import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")


def _dicom_pixels(path: Path) -> np.ndarray:
    """A DICOM file's pixels as uint8, gray (H, W) or RGB (H, W, 3), MONOCHROME1 inverted."""
    try:
        import pydicom
    except ImportError:
        raise DataError(
            f"cannot read DICOM {path}: pydicom is not installed (pip install pydicom)"
        ) from None
    try:
        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array)
    except Exception as err:  # noqa: BLE001 - any pydicom failure: an unreadable file
        raise DataError(f"cannot read DICOM {path}: {type(err).__name__}: {err}") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # a multi-frame image: its first frame
    if arr.ndim not in (2, 3):
        raise DataError(f"cannot read DICOM {path}: pixel array of shape {arr.shape}")
    out = arr if arr.dtype == np.uint8 else _to_uint8(arr)
    if arr.ndim == 2 and str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: the lowest value is white
    return out[..., :3] if out.ndim == 3 else out


def _pil(path: Path) -> Image.Image:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return Image.fromarray(_dicom_pixels(path))
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def read_image(path: Path | str, spec: dict[str, Any]) -> np.ndarray:
    """``path`` decoded and preprocessed as ``spec`` says (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read image {path}: no such file")
    kind = spec.get("kind")
    if kind == "resize_crop":
        if path.suffix.lower() in DICOM_SUFFIXES:
            pixels = _dicom_pixels(path)
            gray = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels).convert("L"))
        else:
            gray = load_gray(path)
        return preprocess(gray, int(spec["resize"]), int(spec["crop"]))
    if kind == "resize":
        img = _pil(path)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = Image.fromarray(_to_uint8(np.asarray(img)))
        img = img.convert("L" if spec.get("color") == "gray" else "RGB")
        size = int(spec["size"])
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
        return np.ascontiguousarray(arr[..., None] if arr.ndim == 2 else arr)
    raise DataError(f"preprocessing kind {kind!r} is not one qtl knows (resize_crop | resize)")


def list_images(source: Path | str) -> list[Path]:
    """The image files a ``predict.images`` value names: a folder (searched recursively,
    sorted; PNG, JPEG, DICOM by suffix) or a CSV whose ``path`` column (else its first column)
    holds paths, relative ones to the CSV's folder. Listed files are not opened here."""
    import csv

    source = Path(source).expanduser()
    if source.is_dir():
        wanted = IMAGE_SUFFIXES + DICOM_SUFFIXES
        return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not source.is_file():
        raise DataError(
            f"predict.images={source}: no such folder or file (expected a folder of PNG/JPEG/"
            "DICOM images or a CSV with a `path` column)"
        )
    if source.suffix.lower() != ".csv":
        raise DataError(
            f"predict.images={source}: a {source.suffix or 'suffix-less'} file; expected a "
            "folder of images or a .csv with a `path` column"
        )
    try:
        with source.open(newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"predict.images={source}: not a readable CSV ({err})") from None
    if not rows:
        raise DataError(f"predict.images={source}: the CSV is empty")
    header = [c.strip().lower() for c in rows[0]]
    column = header.index("path") if "path" in header else 0
    body = rows[1:] if "path" in header else rows
    return [
        p if (p := Path(r[column].strip()).expanduser()).is_absolute() else source.parent / p
        for r in body
        if len(r) > column and r[column].strip()
    ]
