"""A dataset named by what it holds, not where it lies: the data part of a run's identity.

A run's identity (``qtl.record.identity``) holds these digests instead of ``data.root`` and the
other data paths, so a dataset copied to a node's scratch disk (or any other folder) is the
same data and every run that used it still resumes:

- label files (the NIH-CXR-LT CSVs, the MIMIC-CXR-LT CSV, the ``*_labels`` arrays of a MedMNIST
  ``.npz``): sha256 of their bytes, so one changed label is a changed identity;
- images: a manifest of the images the label files name — relative name and size in bytes,
  hashed (for a MedMNIST ``.npz``: each image array's stored size and CRC-32), not every
  image's bytes: reading 112,120 PNGs to start a run would cost more than the run's first
  epoch on small settings;
- the built-in synthetic CXR set: its generator settings, already identity fields, are its
  content (this module gives no key for it).

Each digest is computed once per dataset and cached as one small JSON file under
``<paths.cache_dir>/content/``, keyed by the file's (or image folder's) absolute path, size and
modification time, so a grid of runs hashes nothing twice; each entry is written atomically
(one file per entry, safe on a shared filesystem). A file rewritten in place changes its
mtime, so its digest is computed again. An image replaced in place by one of the same name
and a different size inside a subfolder does not touch its folder's mtime: delete
``<paths.cache_dir>/content`` after editing images by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from qtl.config import DataConfig, DataName
from qtl.data.records import DataError
from qtl.utils.files import SaveError, write_json_atomic

FORMAT = 1  # of the cache entries and of the digests: a change renames every entry
_CHUNK = 1 << 20
DIGEST = 16  # hex digits kept of each sha256: 64 bits, short enough to read in a message


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached(cache_dir: Path | None, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or the value a former call stored under ``key`` (a lost or unreadable
    entry is computed again: the cache only saves time)."""
    if cache_dir is None:
        return compute()
    blob = json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str)
    entry = Path(cache_dir) / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(entry.read_text())
        if saved.get("key") == json.loads(blob):
            return saved["value"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    value = compute()
    with contextlib.suppress(SaveError):  # a read-only cache dir: correct, only slower next time
        write_json_atomic(entry, {"key": json.loads(blob), "value": value})
    return value


def file_digest(path: Path | str, cache_dir: Path | None = None) -> str:
    """sha256 of a file's bytes (cached by path, size and mtime)."""
    path = Path(path).expanduser()

    def compute() -> str:
        h = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()[:DIGEST]

    try:
        return _cached(cache_dir, {"kind": "file", **_stat_key(path)}, compute)
    except OSError as err:
        raise DataError(f"{path}: cannot read it to identify the data ({err}).") from err


def image_manifest(
    folder: Path,
    paths: Callable[[], Iterable[Path]],
    cache_dir: Path | None = None,
    *,
    key: Any = None,
) -> str:
    """sha256 of the sorted (name relative to ``folder``, size) of ``paths()`` (called only
    when the manifest is not cached); a missing image
    counts with size -1 (the run reports it through ``data.on_bad_image``). Cached by the
    folder's path, size and mtime and ``key`` (the digests of the label files naming them)."""
    folder = Path(folder).expanduser()

    def compute() -> str:
        rows = []
        for p in paths():
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            try:
                name = p.relative_to(folder).as_posix()
            except ValueError:  # an absolute path elsewhere: named as it is
                name = p.as_posix()
            rows.append(f"{name}\t{size}")
        h = hashlib.sha256()
        for row in sorted(rows):
            h.update(row.encode() + b"\n")
        return h.hexdigest()[:DIGEST]

    try:
        stat = _stat_key(folder)
    except OSError as err:
        raise DataError(f"image folder {folder}: cannot read it ({err}).") from err
    return _cached(cache_dir, {"kind": "images", **stat, "labels": key}, compute)


def npz_digests(path: Path | str, cache_dir: Path | None = None) -> dict[str, str]:
    """A MedMNIST ``.npz``: ``labels`` (sha256 of every ``*_labels`` member's bytes) and
    ``images`` (sha256 of the other members' names, sizes and CRC-32s, from the zip's
    directory: no image is read)."""
    path = Path(path).expanduser()

    def compute() -> dict[str, str]:
        labels, images = hashlib.sha256(), hashlib.sha256()
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if info.filename.endswith("_labels.npy"):
                    labels.update(info.filename.encode() + b"\0" + zf.read(info) + b"\0")
                else:
                    images.update(f"{info.filename}\t{info.file_size}\t{info.CRC}\n".encode())
        return {"labels": labels.hexdigest()[:DIGEST], "images": images.hexdigest()[:DIGEST]}

    try:
        return _cached(cache_dir, {"kind": "npz", **_stat_key(path)}, compute)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read it to identify the data ({err}).") from err


def cxr_digests(
    data: DataConfig, labels: Sequence[str], cache_dir: Path | None = None
) -> dict[str, str]:
    """The content keys of NIH-CXR-LT (+ MIMIC-CXR-LT) data: ``labels_<split>`` per label file,
    ``images`` for the NIH image set; ``external_labels`` and ``external_images`` for the
    external test set. Nothing for the built-in synthetic set (its settings are its content).
    The label files are read for the image names only when the manifest is not cached."""
    from qtl.data.mimic import read_mimic
    from qtl.data.nih import SPLITS, label_file, read_nih_split

    if data.name != DataName.nih_cxr_lt or not data.root:
        return {}
    root = Path(data.root).expanduser()
    folder = Path(data.image_dir).expanduser() if data.image_dir else root / "images"
    out = {}
    for s in SPLITS:
        if not label_file(root, s).is_file():  # the reader's own message for a missing file
            read_nih_split(root, s, labels, data.image_dir, check_files=False)
        out[f"labels_{s}"] = file_digest(label_file(root, s), cache_dir)

    def nih_paths() -> list[Path]:
        return [
            p
            for s in SPLITS
            for p in read_nih_split(root, s, labels, data.image_dir, check_files=False).paths
        ]

    out["images"] = image_manifest(folder, nih_paths, cache_dir, key=sorted(out.items()))
    if data.external_csv and data.external_root:
        csv, ext_root = Path(data.external_csv).expanduser(), Path(data.external_root).expanduser()
        out["external_labels"] = file_digest(csv, cache_dir)
        out["external_images"] = image_manifest(
            ext_root,
            lambda: read_mimic(csv, ext_root, labels, check_files=False).paths,
            cache_dir,
            key=out["external_labels"],
        )
    return out


def medmnist_digests(
    data: DataConfig, data_dir: Path | None, cache_dir: Path | None = None
) -> dict[str, str]:
    """The content keys of the MedMNIST file a run reads (see :func:`npz_digests`); the
    synthetic stand-in is written first when the run would write it, so its digests are
    those of the file the run trains on."""
    from qtl.data.medmnist import DEFAULT_ROOT, medmnist_config, open_medmnist
    from qtl.data.medmnist_info import medmnist_path
    from qtl.data.medmnist_synthetic import ensure_synthetic

    mcfg = medmnist_config(data, data_dir)
    root = Path(mcfg.root) if mcfg.root else DEFAULT_ROOT
    path = medmnist_path(root, mcfg.flag, mcfg.size)
    if mcfg.synthetic:  # as open_medmnist: a missing or stale synthetic file is written
        ensure_synthetic(
            root,
            mcfg.flag,
            mcfg.size,
            sizes=mcfg.synth_sizes,
            seed=mcfg.synth_seed,
            noise=mcfg.synth_noise,
        )
    try:
        return npz_digests(path, cache_dir)
    except DataError:
        open_medmnist(mcfg)  # the reader's own message for a missing or damaged file
        raise
