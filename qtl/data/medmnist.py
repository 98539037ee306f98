"""Reader for MedMNIST's own files: ``{flag}.npz`` (28 px) and ``{flag}_{size}.npz``.

Each file holds ``train_images``, ``train_labels``, ``val_*`` and ``test_*``; images are uint8
N x H x W (gray) or N x H x W x 3, labels N x L integers (L = 1, except ChestMNIST's 14 0/1
columns). Everything is checked against the INFO table (:mod:`qtl.data.medmnist_info`) before
a model sees it, because a wrong file otherwise fails late and obscurely (a label out of range
is a silent NaN in a one-hot loss; a gray file for an RGB flag breaks the patch embedding's
shape). Every error names the file and the field.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import DataConfig
from qtl.data.medmnist_info import (
    SPLITS,
    SYNTHETIC_KEY,
    FlagInfo,
    Task,
    file_name,
    flag_info,
    medmnist_path,
)
from qtl.data.records import DataError


# an extra key the synthetic generator writes (JSON); the real files never carry it
@dataclass
class MedMNISTConfig:
    """``data=medmnist``: which set, where its files are, and the synthetic stand-in."""

    name: str = "medmnist"
    flag: str = "retinamnist"  # one of the 12 2D sets (qtl.data.medmnist_info.FLAGS)
    size: int = 28  # 28 | 64 | 128 | 224: reads {flag}.npz or {flag}_{size}.npz
    root: str | None = None  # folder of the .npz files; null = .cache/qtl/medmnist
    synthetic: bool = False  # true: no file there -> write the built-in synthetic one there
    synth_seed: int = 0  # the synthetic set's own seed
    synth_sizes: dict[str, int] = field(
        default_factory=lambda: {"train": 1000, "val": 200, "test": 400}
    )  # capped by the official split sizes
    synth_noise: float = 0.08  # pixel noise std of the synthetic images (0..1 scale)
    check_split_sizes: bool | None = None  # null: official sizes required of real files only
    binary_logits: int = 1  # binary sets: 1 (sigmoid BCE) | 2 (softmax CE, MedMNIST v2 style)


DEFAULT_ROOT = Path(".cache") / "qtl" / "medmnist"


def open_medmnist(cfg: MedMNISTConfig) -> MedMNISTData:
    """The checked data a run trains on.

    ``cfg.synthetic``: the file under ``cfg.root``, written first from the synthetic generator
    when it is missing or was made with other settings (a real file there is never
    overwritten, and is what the run reads). Otherwise a real file only: ``cfg.root``, then
    the ``medmnist`` package's own folder (:func:`package_root`); a synthetic file met there
    is passed over, and none found stops the run (:class:`MedMNISTMissing`), never falling
    back to synthetic data.
    """
    root = Path(cfg.root) if cfg.root else DEFAULT_ROOT
    if cfg.synthetic:
        from qtl.data.medmnist_synthetic import ensure_synthetic

        ensure_synthetic(
            root,
            cfg.flag,
            cfg.size,
            sizes=cfg.synth_sizes,
            seed=cfg.synth_seed,
            noise=cfg.synth_noise,
        )
        return load_medmnist(root, cfg.flag, cfg.size, check_split_sizes=cfg.check_split_sizes)
    path = find_real_file([root, package_root()], cfg.flag, cfg.size)
    return read_npz(path, cfg.flag, cfg.size, check_split_sizes=cfg.check_split_sizes)


def package_root() -> Path:
    """Where the ``medmnist`` package keeps its downloads: ``~/.medmnist`` (medmnist 3.0.2,
    ``medmnist.info.get_default_root``; it reads no environment variable or config file)."""
    return Path.home() / ".medmnist"


ZENODO = "https://zenodo.org/records/10519652"  # MedMNIST v3 (MedMNIST+), the package's source


def is_synthetic_file(path: Path) -> bool:
    """Whether ``path`` carries the synthetic generator's marker (read without the arrays)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return SYNTHETIC_KEY in npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False  # unreadable: the reader names the problem


def find_real_file(roots: list[Path], flag: str, size: int) -> Path:
    """The first real ``{flag}[_{size}].npz`` in ``roots``; :class:`MedMNISTMissing` saying
    where it looked and where to get the file when there is none."""
    name = file_name(flag, size)
    looked, synthetic = [], []
    for root in dict.fromkeys(Path(r).expanduser() for r in roots):
        path = medmnist_path(root, flag, size)
        looked.append(str(root))
        if path.is_file():
            if not is_synthetic_file(path):
                return path
            synthetic.append(str(path))
    passed = (
        f" ({', '.join(synthetic)}: qtl's synthetic stand-in, not used for real data)"
        if synthetic
        else ""
    )
    raise MedMNISTMissing(
        f"data=medmnist: no real {name} in {' or '.join(looked)}{passed}. Get it with "
        f"`pip install medmnist` and `python -m medmnist download --size={size}` (writes "
        f"~/.medmnist), or from {ZENODO}/files/{name}, into data.root; or run on qtl's "
        "synthetic stand-in with data.synthetic=true."
    )


class MedMNISTMissing(DataError, FileNotFoundError):
    """No MedMNIST file where the config points (a user error that is also a missing file)."""


class MedMNISTFormatError(DataError):
    """A MedMNIST file that is not what its flag and size promise."""

    def __init__(self, path: Path | str, field: str, message: str):
        self.path, self.field = Path(path), field
        super().__init__(f"{path}: field '{field}': {message}")


@dataclass(frozen=True)
class Split:
    """One split: images uint8 (N, H, W, C) (gray gets C = 1) and labels (N, L) int."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class MedMNISTData:
    """A checked file: its INFO entry, size, origin and the three splits."""

    info: FlagInfo
    size: int
    path: Path
    splits: dict[str, Split]
    synthetic: dict | None  # the generator's settings, or None for a real file

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.info.channels)


def load_medmnist(
    root: Path | str, flag: str, size: int = 28, *, check_split_sizes: bool | None = None
) -> MedMNISTData:
    """Read and check ``{root}/{flag}[_{size}].npz``.

    ``check_split_sizes``: also require the official split sizes (catches a truncated
    download). ``None``: check real files, not synthetic ones (their sizes are reduced).
    """
    path = medmnist_path(root, flag, size)
    if not path.is_file():
        raise MedMNISTMissing(
            f"{path}: no such MedMNIST file (expected {file_name(flag, size)} in {root}); "
            "downloads are not done by qtl: copy the file there, or write a synthetic one with "
            f"`python -m qtl.data.medmnist_synthetic --root {root} --flag {flag} --size {size}`"
        )
    return read_npz(path, flag, size, check_split_sizes=check_split_sizes)


def read_npz(
    path: Path | str, flag: str, size: int, *, check_split_sizes: bool | None = None
) -> MedMNISTData:
    """Read one MedMNIST npz file and check it against the INFO entry of ``flag``."""
    path = Path(path)
    info = flag_info(flag)
    file_name(flag, size)  # validates size
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = f"{err}" if str(err) else type(err).__name__
        raise MedMNISTFormatError(path, "file", f"not a readable .npz archive ({reason})") from None
    with npz:
        keys = set(npz.files)
        synthetic = None
        if SYNTHETIC_KEY in keys:
            synthetic = _json_field(path, npz)
        if check_split_sizes is None:
            check_split_sizes = synthetic is None
        splits = {}
        for split in SPLITS:
            for kind in ("images", "labels"):
                if f"{split}_{kind}" not in keys:
                    raise MedMNISTFormatError(
                        path,
                        f"{split}_{kind}",
                        f"missing (the file has: {', '.join(sorted(keys)) or 'nothing'})",
                    )
            images = _check_images(path, f"{split}_images", _field(path, npz, f"{split}_images"),
                                   info, size)  # fmt: skip
            labels = _check_labels(path, f"{split}_labels", _field(path, npz, f"{split}_labels"),
                                   info)  # fmt: skip
            if labels.shape[0] != images.shape[0]:
                raise MedMNISTFormatError(
                    path,
                    f"{split}_labels",
                    f"{labels.shape[0]} rows but {split}_images has {images.shape[0]} images",
                )
            expected = info.splits[split]
            if check_split_sizes and images.shape[0] != expected:
                raise MedMNISTFormatError(
                    path,
                    f"{split}_images",
                    f"{images.shape[0]} images, but {flag}'s official {split} split has "
                    f"{expected} (a truncated file? pass check_split_sizes=False for a subset)",
                )
            splits[split] = Split(images, labels)
    return MedMNISTData(info, size, path, splits, synthetic)


def _field(path: Path, npz: Any, name: str) -> np.ndarray:
    """One array of the archive; a member cut short or damaged names its field."""
    try:
        return npz[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise MedMNISTFormatError(path, name, f"unreadable ({type(err).__name__}: {err})") from None


def _json_field(path: Path, npz: Any) -> dict:
    try:
        value = json.loads(str(_field(path, npz, SYNTHETIC_KEY)))
    except ValueError as err:
        raise MedMNISTFormatError(path, SYNTHETIC_KEY, f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise MedMNISTFormatError(path, SYNTHETIC_KEY, "not a JSON object")
    return value


def _check_images(path: Path, field: str, a: np.ndarray, info: FlagInfo, size: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise MedMNISTFormatError(path, field, f"dtype {a.dtype}, expected uint8")
    if info.channels == 1:
        if a.ndim != 3:
            raise MedMNISTFormatError(
                path,
                field,
                f"shape {a.shape}: {info.flag} has 1 channel, stored as N x H x W "
                f"(got {a.shape[-1] if a.ndim == 4 else '?'} channels)",
            )
        a = a[..., None]
    elif a.ndim != 4 or a.shape[-1] != info.channels:
        got = a.shape[-1] if a.ndim == 4 else 1
        raise MedMNISTFormatError(
            path,
            field,
            f"shape {a.shape}: {info.flag} has {info.channels} channels (N x H x W x "
            f"{info.channels}), got {got}",
        )
    if a.shape[1:3] != (size, size):
        raise MedMNISTFormatError(
            path, field, f"images are {a.shape[1]}x{a.shape[2]}, expected {size}x{size}"
        )
    return a


def _check_labels(path: Path, field: str, a: np.ndarray, info: FlagInfo) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise MedMNISTFormatError(path, field, f"dtype {a.dtype}, expected an integer type")
    columns = info.label_columns
    if a.ndim != 2 or a.shape[1] != columns:
        raise MedMNISTFormatError(
            path, field, f"shape {a.shape}, expected (N, {columns}) for {info.flag}"
        )
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        top = 1 if info.task == Task.multi_label else info.n_classes - 1
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            what = "0/1 per label" if info.task == Task.multi_label else f"classes 0..{top}"
            raise MedMNISTFormatError(
                path, field, f"label value {bad} out of range ({info.flag}: {what})"
            )
    return a.astype(np.int32)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 in [-1, 1]: MedMNIST's own transform (mean 0.5, std 0.5)."""
    return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def medmnist_config(data: DataConfig, data_dir: Path | str | None = None) -> MedMNISTConfig:
    """The reader's view of a run's ``data`` group (``data=medmnist``); ``data.root`` null =
    ``<data_dir>/medmnist`` (``paths.data_dir``)."""
    root = data.root or str(Path(data_dir) / "medmnist" if data_dir else DEFAULT_ROOT)
    return MedMNISTConfig(
        flag=data.flag,
        size=int(data.size),
        root=root,
        synthetic=bool(data.synthetic),
        synth_seed=int(data.synth_seed),
        synth_sizes={k: int(v) for k, v in data.synth_sizes.items() if k in SPLITS},
        synth_noise=float(data.synth_noise),
        check_split_sizes=data.check_split_sizes,
        binary_logits=int(data.binary_logits),
    )
