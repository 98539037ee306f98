"""Several processes fill one image cache and one feature store at once, as the nodes of a
cluster do over a shared filesystem - here one without file locks (``flock`` fails with
ENOLCK, as on an NFS mount without a lock manager; Lustre without ``-o flock`` gives ENOSYS),
so nothing serialises them: every process must still end with exactly the right images and
features, and the stores with whole entries only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from qtl.data.cache import cached_splits, open_cache
from qtl.data.preprocess import load_gray, preprocess
from qtl.data.source import load_splits
from qtl.data.synthetic import generate
from qtl.labels import CXR8

pytestmark = pytest.mark.slow

PROCS = 4
SIZES = {"train": 160, "val": 16, "test": 16, "external": 8}

_NO_LOCKS = """
import errno, fcntl, os, sys, time
def flock(*args, **kwargs):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = flock


def start_together():
    # after the imports: say ready, then wait for the word (slow imports on a loaded machine
    # would otherwise let one process finish before another begins)
    open(f"{sys.argv[1]}.ready-{os.getpid()}", "w").close()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.005)
"""

_FILL_IMAGES = """
import numpy as np
from qtl.config import DataConfig, DataName
from qtl.data.cache import cached_splits
from qtl.data.preprocess import load_gray, preprocess
from qtl.data.source import load_splits
from qtl.labels import CXR8
start_together()
cfg = DataConfig(name=DataName.synthetic, root=sys.argv[2], resize=40, crop=32, workers=2,
                 cache_dir=sys.argv[3], synth_sizes=SIZES, synth_image_px=96)
splits = load_splits(cfg, CXR8)
data = cached_splits(cfg, splits)
for name, split in splits.items():
    want = np.stack([preprocess(load_gray(p), 40, 32) for p in split.paths])
    assert np.array_equal(data.images[name][np.arange(len(split))], want), name
print("built", data.built, flush=True)
"""

_FILL_FEATURES = """
import numpy as np
from qtl.data.features import features_for
start_together()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(150, 8, 8), dtype=np.uint8)
embed = lambda x: x.reshape(len(x), -1)[:, :6].astype(np.float32) / 255.0
got = features_for(sys.argv[2], {"k": 1, "dtype": "float32"}, images_for=lambda: (images, {}),
                   embed=embed, width=6, chunk=16, batch_size=8, level=3)
assert np.array_equal(got.features, embed(images)), "features differ"
print("computed", got.computed, flush=True)
"""


def _race(script: str, *args: str, tmp_path: Path) -> list[str]:
    """Run ``script`` in PROCS processes started at the same instant; their stdouts."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NO_LOCKS + script, str(go), *args],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCS)
    ]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob(f"{go.name}.ready-*"))) < PROCS:  # every one imported
        assert time.monotonic() < deadline, "the racing processes did not start"
        assert all(p.poll() is None for p in procs), "a racing process died before the start"
        time.sleep(0.05)
    go.touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*.tmp")]


def test_processes_fill_one_image_cache_at_once_without_locks(tmp_path):
    root = generate(tmp_path / "synth", sizes=SIZES, image_px=96, seed=0)
    cache = tmp_path / "cache"
    outs = _race(_FILL_IMAGES.replace("SIZES", repr(SIZES)), str(root), str(cache),
                 tmp_path=tmp_path)  # fmt: skip
    total = sum(SIZES.values())
    built = [int(o.split("built")[1]) for o in outs]
    # the lock really was unavailable to the processes that raced for the same entries
    assert sum("has no file locks" in o for o in outs) >= 2, outs
    assert sum(built) >= total  # together they built everything (some of it twice)
    assert _leftovers(cache) == []
    store = open_cache(cache)
    assert sum(1 for p in store.root.glob("img/*/*")) == total

    # a later run reads it all, builds nothing, and gets the exact pixels
    from qtl.config import DataConfig, DataName

    cfg = DataConfig(name=DataName.synthetic, root=str(root), resize=40, crop=32, workers=2,
                     cache_dir=str(cache), synth_sizes=SIZES, synth_image_px=96)  # fmt: skip
    splits = load_splits(cfg, CXR8)
    data = cached_splits(cfg, splits)
    assert data.built == 0
    for name, split in splits.items():
        want = np.stack([preprocess(load_gray(p), 40, 32) for p in split.paths])
        np.testing.assert_array_equal(data.images[name][np.arange(len(split))], want)


def test_processes_fill_one_feature_store_at_once_without_locks(tmp_path):
    store = tmp_path / "features" / "key"
    outs = _race(_FILL_FEATURES, str(store), tmp_path=tmp_path)
    assert sum("has no file locks" in o for o in outs) >= 2, outs
    assert _leftovers(store) == []
    assert (store / "manifest.json").exists()
    assert len(list(store.glob("chunk-*.qtlf"))) == 10  # 150 rows in chunks of 16
