"""The persistent preprocessed-image cache: decode + resize + crop each image once, ever.

Layout: one file per entry (:class:`qtl.data.store.FileStore`: written under a temporary
name and renamed, so every node of a cluster may fill one cache on a shared filesystem at
once - no database, no lock on the hot path), shared by every run and seed. Two kinds of
entries:

* ``img:<hash>`` -> one encoded crop (:mod:`qtl.data.codec`). The hash covers the source file
  identity (absolute path, size, mtime in ns) and every preprocessing setting, so changing
  the crop, the resize or the file itself never serves a stale image. Identity by stat
  instead of a content hash: knowing whether 112k images are cached then costs 112k stat
  calls, not reading ~45 GB; the price is a rebuild after copying the dataset elsewhere.
* ``index:<hash>`` -> for one split (label file identity + its ordered image paths + the
  settings) the entry key of each image and the bad images found. A training run that finds
  a complete index reads only the cache: it never opens, or even stats, an original image,
  so runs keep working with the sources moved away. ``mode=cache`` always re-checks every
  source file and rewrites the index; that is how an image replaced in place is picked up.

Every entry is renamed into place after the image is fully encoded, so a killed build leaves
whole entries or none; the zstd checksum catches damage on read, and a damaged entry is
rebuilt from its source file (or reported when that is gone).

Nothing read from the cache is ever unpickled: entries are bytes, and the codec's header
checks refuse anything that is not qtl's encoding (a planted pickle included) before it is
decoded: a warning naming the entry's file, then rebuilt from the source image or, with the
source gone, a DataError. A cache directory written by an older qtl (a diskcache SQLite
database, ``cache.db``) is not read: its images are built again into the new layout, once,
and a note says how much space deleting the old database frees.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import DataConfig, OnBadImage, QtlConfig
from qtl.data.codec import FILTER, CorruptEntry, decode, encode
from qtl.data.preprocess import load_gray, preprocess
from qtl.data.records import DataError, Split
from qtl.data.store import LAYOUT, OLD_DATABASE, FileStore
from qtl.progress import bar
from qtl.utils.files import file_lock

FORMAT = 1  # bump when the stored layout or the preprocessing code changes what is stored
_CHUNK = 16  # images per build task
_SHOWN = 20  # bad files named in an error message; the full list goes to a file


def workers_for(cfg: DataConfig) -> int:
    """``data.workers``, or one thread per core this process may use (launchers pin jobs)."""
    if cfg.workers > 0:
        return cfg.workers
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def open_cache(directory: Path | str) -> FileStore:
    """The image cache at ``directory`` (created if needed); never evicts (a full NIH cache
    is ~2.5 GB)."""
    store = FileStore(directory)
    _note_old_database(Path(directory))
    return store


_NOTED: set[Path] = set()


def _note_old_database(directory: Path) -> None:
    """Once per process: the old layout's database is left alone, and what deleting frees."""
    old = directory / OLD_DATABASE
    if directory in _NOTED or not old.exists():
        return
    _NOTED.add(directory)
    size = sum(
        p.stat().st_size
        for p in directory.rglob("*")
        if p.is_file() and LAYOUT not in p.relative_to(directory).parts
    )
    print(
        f"[qtl] note: {old} is the image cache of an older qtl (a SQLite database, unsafe on "
        "shared filesystems); it is no longer read, and its images are built again into "
        f"{directory / LAYOUT}. Delete {old} and the numbered folders beside it to free "
        f"{size / 2**20:.0f} MiB.",
        flush=True,
    )


def _where(cache: FileStore, key: str) -> str:
    return f"entry {key!r} ({cache.path(key)})"


@dataclass(frozen=True)
class Prep:
    """Every setting that changes a stored image."""

    resize: int
    crop: int

    @classmethod
    def of(cls, cfg: DataConfig) -> Prep:
        return cls(cfg.resize, cfg.crop)

    def tag(self) -> dict[str, Any]:
        return {"format": FORMAT, "filter": FILTER, "resize": self.resize, "crop": self.crop}


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:40]


def entry_key(prep: Prep, path: Path, st: os.stat_result) -> str:
    return "img:" + _hash(prep.tag(), str(Path(path).absolute()), st.st_size, st.st_mtime_ns)


def index_key(prep: Prep, split: Split) -> str:
    st = os.stat(split.source)
    return "index:" + _hash(
        prep.tag(),
        split.name,
        str(Path(split.source).absolute()),
        st.st_size,
        st.st_mtime_ns,
        [str(Path(p).absolute()) for p in split.paths],
    )


@dataclass(frozen=True)
class BadImage:
    id: str
    path: str
    reason: str


@dataclass
class SplitEntries:
    """Where each image of a split lives in the cache (None for a bad image)."""

    keys: list[str | None]
    bad: dict[int, str] = field(default_factory=dict)  # position -> reason
    built: int = 0  # entries written by this call
    cached: int = 0  # entries found already cached by this call


def _bad_list(split: Split, bad: dict[int, str]) -> list[BadImage]:
    return [BadImage(split.ids[i], str(split.paths[i]), bad[i]) for i in sorted(bad)]


def _raise_bad(split: Split, bad: dict[int, str], directory: Path) -> None:
    items = _bad_list(split, bad)
    listing = "\n".join(f"  {b.path}: {b.reason}" for b in items[:_SHOWN])
    more = ""
    if len(items) > _SHOWN:
        report = directory / f"bad-images-{split.name}.txt"
        report.write_text("".join(f"{b.path}\t{b.reason}\n" for b in items))
        more = f"\n  ... and {len(items) - _SHOWN} more (all listed in {report})"
    hint = ""
    missing = [Path(b.path) for b in items if b.reason == "missing file"]
    if missing:
        hint = " Missing files: check data.image_dir / data.external_root or the download."
        absent = sorted({str(p.parent) for p in missing if not p.parent.exists()})
        if absent:
            hint += f" These folders do not exist: {', '.join(absent[:3])}."
    raise DataError(
        f"{len(items)} bad image(s) found so far in split '{split.name}' (listed in "
        f"{split.source}):\n{listing}{more}\nFix or remove them, or set "
        f"data.on_bad_image=skip to leave them out (their ids are then recorded).{hint}"
    )


def fill(
    cache: Any,
    split: Split,
    prep: Prep,
    *,
    workers: int,
    on_bad: OnBadImage,
    progress: bool = False,
) -> SplitEntries:
    """Make sure every readable image of ``split`` is cached; report the unreadable ones.

    Stats every source (missing files are bad images), then decodes only what is not
    cached yet, in threads (PIL releases the GIL while decoding and resizing). With
    ``on_bad=fail`` the first bad image stops the build (entries already written stay).
    """
    from joblib import Parallel, delayed

    n = len(split)
    entries = SplitEntries(keys=[None] * n)
    for i, path in enumerate(split.paths):
        try:
            entries.keys[i] = entry_key(prep, path, os.stat(path))
        except FileNotFoundError:
            entries.bad[i] = "missing file"
        except OSError as err:
            entries.bad[i] = f"cannot stat: {err.strerror or err}"
    directory = Path(cache.directory)
    if entries.bad and on_bad == OnBadImage.fail:
        _raise_bad(split, entries.bad, directory)
    todo = [i for i, k in enumerate(entries.keys) if k is not None and k not in cache]
    entries.cached = n - len(entries.bad) - len(todo)
    stop = threading.Event()
    lock = threading.Lock()

    def work(chunk: list[int]) -> int:
        done = 0
        for i in chunk:
            if stop.is_set():
                break
            try:
                image = preprocess(load_gray(split.paths[i]), prep.resize, prep.crop)
            except (DataError, FileNotFoundError) as err:  # unreadable, or deleted since stat
                reason = str(err).removeprefix(f"cannot read image {split.paths[i]}: ")
                with lock:
                    entries.bad[i] = "missing file" if isinstance(err, OSError) else reason
                if on_bad == OnBadImage.fail:
                    stop.set()
                continue
            cache.set(entries.keys[i], encode(image))
            done += 1
        return done

    chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    with bar(
        enabled=progress,
        total=n,
        initial=entries.cached,
        desc=f"cache {split.name}",
        unit="img",
    ) as pbar:
        if chunks:
            runner = Parallel(
                n_jobs=min(workers, len(chunks)), prefer="threads", return_as="generator_unordered"
            )
            for done in runner(delayed(work)(c) for c in chunks):
                entries.built += done
                pbar.update(done)
    if entries.bad:
        for i in entries.bad:
            entries.keys[i] = None
        if on_bad == OnBadImage.fail:
            _raise_bad(split, entries.bad, directory)
    return entries


def _write_index(cache: Any, key: str, entries: SplitEntries) -> None:
    payload = {"keys": entries.keys, "bad": {str(i): r for i, r in entries.bad.items()}}
    cache.set(key, json.dumps(payload).encode())


def _read_index(cache: Any, key: str, n: int) -> SplitEntries | None:
    raw = cache.get(key)
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
        entries = SplitEntries(
            keys=list(payload["keys"]), bad={int(i): r for i, r in payload["bad"].items()}
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # never unpickled
        warnings.warn(
            f"ignoring cache {_where(cache, key)}: not qtl's index ({type(err).__name__}); "
            "rebuilding it",
            stacklevel=2,
        )
        return None
    if len(entries.keys) != n:
        return None
    return entries


def split_entries(
    cache: Any,
    split: Split,
    prep: Prep,
    *,
    workers: int,
    on_bad: OnBadImage,
    progress: bool = False,
    recheck: bool = False,
) -> SplitEntries:
    """The cache entries of a split: from its index when complete (touching no source
    file), else by :func:`fill` (which then records a new index)."""
    key = index_key(prep, split)

    def complete() -> SplitEntries | None:
        entries = None if recheck else _read_index(cache, key, len(split))
        if entries is None or not all(k in cache for k in entries.keys if k is not None):
            return None
        if entries.bad and on_bad == OnBadImage.fail:
            _raise_bad(split, entries.bad, Path(cache.directory))
        entries.cached = len(split) - len(entries.bad)
        return entries

    if (found := complete()) is not None:
        return found
    # one builder at a time: the sweep's other jobs wait, then find the entries cached
    with file_lock(Path(cache.directory) / ".build.lock", optional=True):
        if (found := complete()) is not None:
            return found
        entries = fill(cache, split, prep, workers=workers, on_bad=on_bad, progress=progress)
        _write_index(cache, key, entries)
    return entries


class CachedImages:
    """Array-like (N, H, W) uint8 view of cached images: ``images[idx]`` reads a batch.

    Reads and decompression run in a thread pool (file reads and zstd release the GIL); what
    the loader needs is only ``len()`` and fancy indexing, as with an in-memory array.
    """

    def __init__(
        self,
        cache: Any,
        keys: list[str],
        paths: list[Path],
        prep: Prep,
        pool: ThreadPoolExecutor,
        threads: int,
    ):
        self.cache, self.keys, self.paths, self.prep, self.pool = cache, keys, paths, prep, pool
        self.shape = (len(keys), prep.crop, prep.crop)
        self.dtype = np.dtype(np.uint8)
        self._threads = max(1, threads)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> np.ndarray:
        """One image; a missing, damaged or foreign entry is rebuilt from its source file."""
        reason = "missing"
        try:
            blob = self.cache.get(self.keys[i])
            if blob is not None:
                image = decode(blob)
                if image.shape == self.shape[1:]:
                    return image
                reason = f"of shape {image.shape}, not {self.shape[1:]}"
        except CorruptEntry as err:  # anything not qtl's encoding: never decoded
            reason = str(err)
        return self._rebuild(i, reason)

    def _rebuild(self, i: int, reason: str) -> np.ndarray:
        path = self.paths[i]
        where = _where(self.cache, self.keys[i])
        if not os.path.exists(path):
            raise DataError(
                f"cache {where} (image {path}) is unusable: {reason}; and that image file is "
                "gone, so it cannot be rebuilt. Put the images back and run mode=cache."
            )
        warnings.warn(
            f"cache {where} is unusable: {reason}; rebuilding it from {path}", stacklevel=2
        )
        image = preprocess(load_gray(path), self.prep.resize, self.prep.crop)
        self.cache.set(self.keys[i], encode(image))
        return image

    def __getitem__(self, idx: Any) -> np.ndarray:
        if np.isscalar(idx):
            return self.read(int(idx))  # type: ignore[arg-type]
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)

        def work(positions: np.ndarray) -> None:
            for j in positions:
                out[j] = self.read(int(idx[j]))

        parts = np.array_split(np.arange(len(idx)), min(self._threads, max(len(idx), 1)))
        list(self.pool.map(work, parts))
        return out


@dataclass
class CachedData:
    """What a run trains and evaluates on: per split the cached images and the kept records."""

    images: dict[str, CachedImages]
    splits: dict[str, Split]  # bad images (on_bad_image=skip) removed
    skipped: dict[str, list[BadImage]]
    built: int = 0  # entries this call had to build
    cached: int = 0  # entries found cached

    def skipped_ids(self) -> dict[str, list[str]]:
        return {name: [b.id for b in bad] for name, bad in self.skipped.items() if bad}


def _keep(split: Split, bad: dict[int, str]) -> Split:
    keep = [i for i in range(len(split)) if i not in bad]
    return replace(
        split,
        ids=tuple(split.ids[i] for i in keep),
        paths=tuple(split.paths[i] for i in keep),
        labels=split.labels[keep],
    )


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _reader_pool(threads: int) -> ThreadPoolExecutor:
    """One reader pool per size per process: the jobs of a multirun reuse it."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="qtl-read")
    return _POOLS[threads]


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def cached_splits(
    cfg: DataConfig,
    splits: dict[str, Split],
    *,
    progress: bool = False,
    recheck: bool = False,
    directory: Path | None = None,
) -> CachedData:
    """Cached views of ``splits``, filling whatever the cache lacks first."""
    cache = open_cache(directory or cache_dir(cfg))
    prep = Prep.of(cfg)
    threads = workers_for(cfg)
    pool = _reader_pool(threads)
    data = CachedData({}, {}, {})
    for name, split in splits.items():
        entries = split_entries(
            cache,
            split,
            prep,
            workers=workers_for(cfg),
            on_bad=cfg.on_bad_image,
            progress=progress,
            recheck=recheck,
        )
        kept = _keep(split, entries.bad) if entries.bad else split
        if len(kept) == 0:
            raise DataError(f"split '{name}' ({split.source}) has no readable image left.")
        keys = [k for k in entries.keys if k is not None]
        data.images[name] = CachedImages(cache, keys, list(kept.paths), prep, pool, threads)
        data.splits[name] = kept
        data.skipped[name] = _bad_list(split, entries.bad)
        data.built += entries.built
        data.cached += entries.cached
    return data


def write_skipped(path: Path, data: CachedData) -> None:
    """The skipped images (id, path, reason) per split, as JSON."""
    payload = {name: [asdict(b) for b in bad] for name, bad in data.skipped.items() if bad}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def build(cfg: QtlConfig, run_dir: Path | None = None) -> CachedData:
    """``mode=cache``: re-check every source image and fill the cache for the run's splits."""
    from qtl.data.source import load_splits
    from qtl.progress import want_progress
    from qtl.utils import paths

    show = want_progress(cfg.progress)
    splits = load_splits(
        cfg.data,
        list(cfg.task.labels),
        progress=show,
        check_files=False,
        data_dir=paths.data_dir(cfg.paths),
    )
    directory = cache_dir(cfg.data)
    data = cached_splits(cfg.data, splits, progress=show, recheck=True)
    total = sum(len(s) for s in splits.values())
    print(
        f"[qtl] cache {directory}: {total} images in {', '.join(splits)}; "
        f"{data.built} built now, {data.cached} were cached already."
    )
    skipped = data.skipped_ids()
    if skipped:
        print(f"[qtl] skipped {sum(map(len, skipped.values()))} bad image(s): {skipped}")
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            write_skipped(Path(run_dir) / "skipped_images.json", data)
    return data
