"""``mode=bench_data``: how fast each stage of the data path runs on this machine.

On a synthetic set in the NIH format (``bench_data.images`` PNGs of ``bench_data.image_px``
pixels, written once under ``.cache/qtl`` and reused) it times the cold path (decode +
preprocess), the cache build, the warm host path (cache -> shuffled uint8 batch), the host
augmented path (warm + flip/rotation in the reader threads) and dm-pix's device augmentation
on the current JAX backend; it checks the cache is lossless and measures bytes per image.
Each stage is timed over several passes and the best is reported (as ``timeit`` does), in
images/s and in images per CPU-second of this process; the load average is recorded with
them, since other work on the machine slows every stage.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import OnBadImage, QtlConfig
from qtl.data.augment import augment, augment_host, draw
from qtl.data.cache import CachedImages, Prep, fill, open_cache, workers_for
from qtl.data.loader import augment_key, batches
from qtl.data.nih import read_nih_split
from qtl.data.preprocess import load_gray, preprocess
from qtl.data.records import Split
from qtl.data.synthetic import generate, spec, spec_hash
from qtl.labels import ALL_LABELS
from qtl.progress import want_progress
from qtl.utils import paths


def _dataset(cfg: QtlConfig, show: bool) -> Split:
    b = cfg.bench_data
    sizes = {"train": b.images, "val": 1, "test": 1, "external": 0}
    params = spec(sizes=sizes, image_px=b.image_px, seed=0)
    root = generate(
        paths.data_dir(cfg.paths) / f"bench-data-{spec_hash(params)}",
        sizes=sizes,
        image_px=b.image_px,
        seed=0,
        progress=show,
    )
    return read_nih_split(root, "train", ALL_LABELS)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


class _Clock:
    """Wall time and this process's CPU time (all threads) of a block.

    Images per CPU-second hardly depend on what else loads the machine; with T threads and
    T idle cores the wall rate approaches T times it (when the work parallelises).
    """

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def rates(self, n: int) -> dict[str, float]:
        return {"img_per_s": _rate(n, self.wall), "img_per_cpu_s": _rate(n, self.cpu)}


def _best(clocks: list[tuple[_Clock, int]]) -> dict[str, float]:
    """Best of several timed passes (as ``timeit``): other load can only slow a pass down."""
    rates = [c.rates(n) for c, n in clocks]
    best = max(rates, key=lambda r: r["img_per_s"])
    return {**best, "passes": len(rates)}


def _cold(split: Split, prep: Prep, n: int, threads: int, passes: int = 3) -> dict[str, float]:
    clocks = []
    for part in np.array_split(np.arange(n), passes):
        paths = [split.paths[i] for i in part]
        with _Clock() as clock, ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: preprocess(load_gray(p), prep.resize, prep.crop), paths))
        clocks.append((clock, len(paths)))
    return _best(clocks)


def _stream(
    images: Any, labels: np.ndarray, batch_size: int, epochs: int, **kw: Any
) -> dict[str, float]:
    """Epochs of shuffled batches, each timed on its own."""
    clocks = []
    for epoch in range(1, epochs + 1):
        n = 0
        with _Clock() as clock:
            for b in batches(images, labels, batch_size, seed=0, epoch=epoch, **kw):
                n += int(b.mask.sum())
        clocks.append((clock, n))
    return _best(clocks)


def _device_augment(batch: np.ndarray, cfg: QtlConfig, reps: int = 3) -> float:
    import jax

    fn = jax.jit(
        partial(augment, hflip_p=cfg.data.hflip_p, max_rotation_deg=cfg.data.max_rotation_deg)
    )
    x = jax.device_put(batch.astype(np.float32))
    fn(x, jax.random.key(0)).block_until_ready()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(x, jax.random.key(i + 1)).block_until_ready()
    return _rate(reps * len(batch), time.perf_counter() - t0)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def bench_data(cfg: QtlConfig, run_dir: Path | None) -> dict[str, Any]:
    """Run the benchmark, print a table, write ``bench_data.json`` to ``run_dir``."""
    import jax

    show = want_progress(cfg.progress)
    b = cfg.bench_data
    load_before = os.getloadavg()
    split = _dataset(cfg, show)
    prep = Prep.of(cfg.data)
    threads = workers_for(cfg.data)
    counts = sorted({1, threads})
    n = len(split)

    cold = {t: _cold(split, prep, min(b.cold_images, n), t) for t in counts}

    # fresh each time: the build is timed
    cache_path = paths.cache_dir(cfg.paths) / "bench-data-cache"
    shutil.rmtree(cache_path, ignore_errors=True)
    cache = open_cache(cache_path)
    with _Clock() as build_clock:
        entries = fill(cache, split, prep, workers=threads, on_bad=OnBadImage.fail, progress=show)
    build_s = build_clock.wall
    keys = [k for k in entries.keys if k is not None]
    value_bytes = [len(cache.get(k)) for k in keys]
    sample = np.random.default_rng(0).choice(n, size=min(50, n), replace=False)

    # compile the per-batch key and draw functions before any timing
    draw(
        augment_key(0, 1, 0),
        b.batch_size,
        hflip_p=cfg.data.hflip_p,
        max_rotation_deg=cfg.data.max_rotation_deg,
    )
    warm, aug = {}, {}
    for t in counts:
        with ThreadPoolExecutor(t) as pool:
            images = CachedImages(cache, keys, list(split.paths), prep, pool, t)
            lossless = all(
                np.array_equal(
                    images.read(int(i)),
                    preprocess(load_gray(split.paths[int(i)]), prep.resize, prep.crop),
                )
                for i in sample
            )
            warm[t] = _stream(images, split.labels, b.batch_size, b.warm_epochs)
            host = partial(
                augment_host,
                hflip_p=cfg.data.hflip_p,
                max_rotation_deg=cfg.data.max_rotation_deg,
                pool=pool,
            )
            aug[t] = _stream(images, split.labels, b.batch_size, b.warm_epochs, transform=host)
            first = images[np.arange(b.batch_size)]
    device_aug = _device_augment(first, cfg)
    cache.close()
    disk_bytes = _dir_bytes(cache_path)

    result = {
        "images": n,
        "image_px": b.image_px,
        "resize": prep.resize,
        "crop": prep.crop,
        "batch_size": b.batch_size,
        "cold": {f"{t}_threads": v for t, v in cold.items()},
        "cache_build_seconds": round(build_s, 2),
        "cache_build": build_clock.rates(n),
        "bytes_per_image_value": round(float(np.mean(value_bytes)), 1),
        "bytes_per_image_on_disk": round(disk_bytes / n, 1),
        "lossless": bool(lossless),
        "warm": {f"{t}_threads": v for t, v in warm.items()},
        "augmented_host": {f"{t}_threads": v for t, v in aug.items()},
        "augment_device_img_per_s": device_aug,
        "jax_backend": jax.default_backend(),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    _print(result)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "bench_data.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[qtl] written to {Path(run_dir) / 'bench_data.json'}")
    return result


def _print(r: dict[str, Any]) -> None:
    def per_thread(d: dict[str, dict[str, float]]) -> str:
        return ", ".join(
            f"{v['img_per_s']:,.0f} ({k.replace('_threads', ' thr')}; "
            f"{v['img_per_cpu_s']:,.0f}/cpu-s)"
            for k, v in d.items()
        )

    m = r["machine"]
    rows = [
        ("cold: decode + preprocess", per_thread(r["cold"])),
        ("cache build", f"{r['cache_build_seconds']} s: " + per_thread({"all": r["cache_build"]})),
        (
            "bytes per cached image",
            f"{r['bytes_per_image_value'] / 1000:.1f} KB value, "
            f"{r['bytes_per_image_on_disk'] / 1000:.1f} KB on disk (lossless: {r['lossless']})",
        ),
        ("warm: cache -> shuffled batch", per_thread(r["warm"])),
        ("augmented, host (OpenCV threads)", per_thread(r["augmented_host"])),
        (
            f"augment on device ({r['jax_backend']}, dm-pix)",
            f"{r['augment_device_img_per_s']:,.0f} img/s",
        ),
        (
            "load average before / after",
            f"{m['load_avg_before']} / {m['load_avg_after']} on {m['cpus']} cpus",
        ),
    ]
    print(
        f"[qtl] bench_data: {r['images']} synthetic {r['image_px']}px PNGs -> "
        f"{r['crop']}x{r['crop']} uint8, batch {r['batch_size']}; images/s (wall) and "
        "images per CPU-second, best of several passes"
    )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
