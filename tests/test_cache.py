"""The preprocessed-image cache: lossless storage, keys, resume after a kill, bad images,
and a warm path that never needs the original files."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import ROOT, TINY, compose, launch
from PIL import Image
from safetensors.numpy import save as st_save

from qtl.config import DataConfig, DataName, OnBadImage
from qtl.data import cache as cache_mod
from qtl.data.cache import Prep, cached_splits, index_key, open_cache
from qtl.data.codec import CorruptEntry, decode, encode
from qtl.data.preprocess import load_gray, preprocess
from qtl.data.records import DataError
from qtl.data.source import load_splits
from qtl.data.synthetic import IMAGE_DIR, MIMIC_DIR, generate
from qtl.labels import CXR8

SIZES = {"train": 24, "val": 8, "test": 8, "external": 6}


def _data(root: Path, cache: Path, **kw) -> DataConfig:
    base = DataConfig(
        name=DataName.synthetic,
        root=str(root),
        resize=40,
        crop=32,
        workers=2,
        cache_dir=str(cache),
        synth_sizes=dict(SIZES),
        synth_image_px=64,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic set in the real NIH / MIMIC formats (PNG and JPEG)."""
    root = tmp_path_factory.mktemp("cache-data") / "synth"
    return generate(root, sizes=SIZES, image_px=64, seed=0)


def _copy(dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "synth"
    shutil.copytree(dataset, root)
    return root


def _expected(split, resize=40, crop=32) -> np.ndarray:
    return np.stack([preprocess(load_gray(p), resize, crop) for p in split.paths])


def test_codec_is_lossless_compact_and_checks_damage():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    ramp = np.add.outer(np.arange(224), np.arange(224)).astype(np.uint8)  # smooth, wraps at 256
    for image in (noise, ramp, np.zeros((7, 3), np.uint8), noise[:1]):
        np.testing.assert_array_equal(decode(encode(image)), image)
    assert len(encode(ramp)) < 1000 < len(encode(noise))  # the row filter finds the structure
    blob = bytearray(encode(ramp))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptEntry):
        decode(bytes(blob))
    with pytest.raises(CorruptEntry):
        decode(b"not zstd at all")
    with pytest.raises(ValueError):
        encode(noise.astype(np.float32))


def test_hit_miss_exact_pixels_and_key_invalidation(dataset, tmp_path):
    cfg = _data(dataset, tmp_path / "cache")
    splits = load_splits(cfg, CXR8)
    total = sum(len(s) for s in splits.values())
    first = cached_splits(cfg, splits)
    assert (first.built, first.cached) == (total, 0)
    for name, split in splits.items():  # cached pixels == preprocess() output, exactly
        got = first.images[name][np.arange(len(split))]
        np.testing.assert_array_equal(got, _expected(split))
    again = cached_splits(cfg, splits)
    assert (again.built, again.cached) == (0, total)

    # another preprocessing setting: new keys, nothing stale served
    other = cached_splits(replace(cfg, crop=24), splits)
    assert other.built == total
    train = splits["train"]
    np.testing.assert_array_equal(other.images["train"][np.arange(3)], _expected(train, 40, 24)[:3])
    assert cached_splits(replace(cfg, resize=48), splits).built == total

    # a source file changed in place: mode=cache's re-check rebuilds exactly that one
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(train.paths[2])
    os.utime(train.paths[2], ns=(1, 1))
    rechecked = cached_splits(cfg, splits, recheck=True)
    assert (rechecked.built, rechecked.cached) == (1, total - 1)
    assert (rechecked.images["train"][2] == 7).all()


def test_warm_path_never_touches_the_source_files(dataset, tmp_path, monkeypatch):
    root = _copy(dataset, tmp_path)
    cfg = _data(root, tmp_path / "cache")
    splits = load_splits(cfg, CXR8)
    expected = {n: _expected(s) for n, s in splits.items()}
    cached_splits(cfg, splits)
    shutil.move(root / IMAGE_DIR, tmp_path / "moved-nih")
    shutil.move(root / MIMIC_DIR / "files", tmp_path / "moved-mimic")

    def no_source_access(*args, **kwargs):
        raise AssertionError("the warm path opened an original image")

    monkeypatch.setattr(cache_mod, "load_gray", no_source_access)
    splits = load_splits(cfg, CXR8, check_files=False)
    warm = cached_splits(cfg, splits)
    assert warm.built == 0
    for name, split in splits.items():
        np.testing.assert_array_equal(warm.images[name][np.arange(len(split))], expected[name])
    # without the cache the same records are a clear error, not a silent gap
    with pytest.raises(DataError, match="missing file") as err:
        cached_splits(cfg, splits, directory=tmp_path / "empty-cache")
    assert f"These folders do not exist: {root / IMAGE_DIR}" in str(err.value)


def test_damaged_entry_is_rebuilt_from_source_or_reported(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    cfg = _data(root, tmp_path / "cache")
    splits = {"val": load_splits(cfg, CXR8)["val"]}
    images = cached_splits(cfg, splits).images["val"]
    cache = open_cache(tmp_path / "cache")
    cache.set(images.keys[1], b"\x28\xb5\x2f\xfd garbage")  # a damaged entry
    with pytest.warns(UserWarning, match="rebuilding"):
        np.testing.assert_array_equal(images[[1]][0], _expected(splits["val"])[1])
    np.testing.assert_array_equal(decode(cache.get(images.keys[1])), images.read(1))
    cache.set(images.keys[1], b"garbage")
    splits["val"].paths[1].unlink()
    with pytest.raises(DataError, match="image file is gone"):
        images.read(1)


def test_foreign_encodings_are_refused_before_decoding():
    """Bytes that are not qtl's encoding fail the header checks, whatever they hold."""
    zstd = zstandard.ZstdCompressor(write_checksum=True)
    image = np.zeros((4, 4), np.uint8)
    # a frame that declares 1 TiB: refused from its header, before anything is allocated
    huge = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x50]) + (1 << 40).to_bytes(8, "little")
    cases = {
        huge: "declares 1099511627776 bytes",
        zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 64): "declares no size",
        zstd.compress(b"\x00" * 64): "safetensors header",
        zstd.compress(st_save({"pixels": image.astype(np.float32)})): "safetensors header",
        zstd.compress(st_save({"pixels": image, "other": image}, {"filter": "up"})): "header",
        zstd.compress(st_save({"pixels": image}, metadata={"filter": "none"})): "not filter 'up'",
        b"\x80\x04\x95 a pickle": "not a zstd frame",
    }
    for blob, message in cases.items():
        with pytest.raises(CorruptEntry, match=message):
            decode(blob)


class _Payload:
    """Unpickling this writes the file ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "x" * 40_000))


def test_planted_pickles_are_never_unpickled(dataset, tmp_path):
    """Entry files replaced by pickles (a planted cache): refused by the codec's header
    checks, named in a warning and rebuilt; with the source gone, a DataError."""
    root = _copy(dataset, tmp_path)
    cfg = _data(root, tmp_path / "cache")
    splits = {"val": load_splits(cfg, CXR8)["val"]}
    images = cached_splits(cfg, splits).images["val"]
    expected = _expected(splits["val"])
    cache = open_cache(tmp_path / "cache")
    marks = [tmp_path / f"pwned{i}" for i in range(4)]
    index = index_key(Prep.of(cfg), splits["val"])
    cache.path(images.keys[1]).write_bytes(pickle.dumps(_Payload(marks[0])))
    cache.path(images.keys[2]).write_bytes(pickle.dumps({"small": "pickle"}))
    cache.path(index).write_bytes(pickle.dumps(_Payload(marks[1])))

    with pytest.warns(UserWarning) as caught:
        again = cached_splits(cfg, splits).images["val"]  # the pickled index: rebuilt
        np.testing.assert_array_equal(again[np.arange(len(expected))], expected)
    text = "\n".join(str(w.message) for w in caught)
    for key in (images.keys[1], images.keys[2], index):
        assert key in text and str(cache.path(key)) in text
    assert "not a zstd frame" in text and "not qtl's index" in text
    assert not any(m.exists() for m in marks)
    for i in (1, 2):  # overwritten with qtl's own encoding
        np.testing.assert_array_equal(decode(cache.get(images.keys[i])), expected[i])

    cache.path(images.keys[3]).write_bytes(pickle.dumps(_Payload(marks[2])))
    splits["val"].paths[3].unlink()  # and its source gone: a clear error, nothing loaded
    with pytest.raises(DataError, match=f"{images.keys[3]}.*entries.*not a zstd frame"):
        images.read(3)
    assert not marks[2].exists()
    with pytest.raises(TypeError, match="values are bytes"):  # and qtl never pickles one
        cache.set("img:" + "0" * 40, {"not": "bytes"})
    for key in ("img:../../../etc/passwd", "img:" + "0" * 40 + "/x", ("a", "tuple"), "other:00"):
        with pytest.raises(ValueError, match="not a qtl image-cache key"):
            cache.path(key)  # type: ignore[arg-type]


def test_an_older_sqlite_cache_is_left_alone_and_rebuilt(dataset, tmp_path, capsys):
    """A cache directory of the diskcache layout: never opened (no SQLite over a shared
    filesystem), its images built again into the file layout, and the space it holds named."""
    root = _copy(dataset, tmp_path)
    directory = tmp_path / "cache"
    (directory / "a1" / "b2").mkdir(parents=True)
    (directory / "cache.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 4080)
    (directory / "a1" / "b2" / "x.val").write_bytes(b"\x00" * (2 << 20))
    cfg = _data(root, directory)
    splits = {"val": load_splits(cfg, CXR8)["val"]}
    data = cached_splits(cfg, splits)
    assert data.built == len(splits["val"]) and data.cached == 0
    out = capsys.readouterr().out
    assert f"{directory / 'cache.db'} is the image cache of an older qtl" in out
    assert "free 2 MiB" in out
    assert (directory / "cache.db").read_bytes().startswith(b"SQLite format 3")  # untouched
    np.testing.assert_array_equal(
        data.images["val"][np.arange(len(splits["val"]))], _expected(splits["val"])
    )


def _break(root: Path) -> tuple[str, str]:
    """Corrupt one training PNG and delete another; their ids."""
    split = load_splits(_data(root, root.parent / "unused"), CXR8)["train"]
    split.paths[3].write_bytes(split.paths[3].read_bytes()[:50])  # truncated PNG
    split.paths[5].unlink()
    return split.ids[3], split.ids[5]


def test_bad_images_fail_with_the_list_or_are_skipped(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    corrupt, missing = _break(root)
    cfg = _data(root, tmp_path / "cache")
    splits = load_splits(cfg, CXR8, check_files=False)
    with pytest.raises(DataError) as err:  # the missing file is found before any decoding
        cached_splits(cfg, splits)
    assert missing in str(err.value) and "missing file" in str(err.value)
    assert "on_bad_image=skip" in str(err.value)
    keep = [i for i, x in enumerate(splits["train"].ids) if x != missing]
    s = splits["train"]
    only_corrupt = {}
    only_corrupt["train"] = replace(
        s,
        ids=tuple(s.ids[i] for i in keep),
        paths=tuple(s.paths[i] for i in keep),
        labels=s.labels[keep],
    )
    with pytest.raises(DataError, match=f"{corrupt}: .*(truncated|cannot|broken)"):
        cached_splits(cfg, only_corrupt)

    skip = replace(cfg, on_bad_image=OnBadImage.skip)
    data = cached_splits(skip, splits)
    assert data.skipped_ids() == {"train": [corrupt, missing]}
    assert len(data.splits["train"]) == len(splits["train"]) - 2
    assert corrupt not in data.splits["train"].ids
    np.testing.assert_array_equal(
        data.images["train"][np.arange(len(data.splits["train"]))],
        _expected(data.splits["train"]),
    )
    # the warm path knows the bad ones from the index: skip serves, fail still refuses
    assert cached_splits(skip, splits).skipped_ids() == {"train": [corrupt, missing]}
    with pytest.raises(DataError, match=corrupt):
        cached_splits(cfg, splits)


def _entries(directory: Path) -> int:
    """Committed image entries, read without writing (the build may be running)."""
    return sum(1 for p in (directory / "entries" / "img").glob("*/*") if not p.name.startswith("."))


@pytest.mark.slow
def test_killed_build_resumes_and_serves_whole_entries(tmp_path):
    """SIGKILL ``mode=cache`` mid-build; the rerun keeps what was written and completes it."""
    sizes = {"train": 300, "val": 16, "test": 16, "external": 0}
    root = generate(tmp_path / "big", sizes=sizes, image_px=384, seed=0)
    cache = tmp_path / "cache"
    args = [
        "mode=cache",
        "data=synthetic",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "data.synth_sizes={train:300,val:16,test:16,external:0}",
        "data.synth_image_px=384",
        "data.workers=1",
        "progress=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _entries(cache) >= 10:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    before = _entries(cache)
    assert 10 <= before < 332

    rerun = launch(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{332 - before} built now, {before} were cached already" in rerun.stdout
    cfg = compose(*[a for a in args if not a.startswith(("mode=", "data.workers="))])
    splits = load_splits(cfg.data, CXR8)
    data = cached_splits(cfg.data, splits)
    assert data.built == 0
    for name, split in splits.items():
        got = data.images[name][np.arange(len(split))]
        np.testing.assert_array_equal(got, _expected(split, cfg.data.resize, cfg.data.crop))


@pytest.mark.slow
def test_cli_cache_then_train_with_sources_moved_away_and_skips_recorded(dataset, tmp_path):
    """``mode=cache`` from the CLI, then a training run with every original image moved away
    (and one bad image skipped): it trains, evaluates and records the skipped id."""
    import json

    from qtl.apps.train import train_and_evaluate

    root = _copy(dataset, tmp_path)
    corrupt, missing = _break(root)
    over = [
        *TINY,
        f"data.root={root}",
        f"data.synth_sizes={{train:{SIZES['train']},val:8,test:8,external:6}}",
        "data.synth_image_px=64",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.on_bad_image=skip",
        "backbone.pretrained=null",
    ]
    built = launch(*over, "mode=cache", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "skipped 2 bad image(s)" in built.stdout
    shutil.move(root / IMAGE_DIR, tmp_path / "moved-nih")
    shutil.move(root / MIMIC_DIR / "files", tmp_path / "moved-mimic")

    run_dir = tmp_path / "run"
    res = train_and_evaluate(compose(*over, "head=cdl", "train.max_epochs=1"), run_dir)
    assert res["skipped_images"] == {"train": [corrupt, missing]}
    assert res["split_sizes"]["train"] == SIZES["train"] - 2
    recorded = json.loads((run_dir / "skipped_images.json").read_text())
    assert [b["id"] for b in recorded["train"]] == [corrupt, missing]
    assert set(res["auroc"]) == {"val", "test", "external"}
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= metrics["data_wait_seconds"] <= metrics["seconds"]


@pytest.mark.slow
def test_bench_data_command_writes_its_numbers(tmp_path):
    import json

    args = [
        "mode=bench_data",
        "bench_data.images=40",
        "bench_data.image_px=64",
        "bench_data.cold_images=10",
        "bench_data.warm_epochs=1",
        "bench_data.batch_size=8",
        "data.resize=40",
        "data.crop=32",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = launch(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warm: cache -> shuffled batch" in proc.stdout
    res = json.loads((tmp_path / "out" / "bench_data.json").read_text())
    assert res["images"] == 40 and res["lossless"] is True
    assert 0 < res["bytes_per_image_value"] < 32 * 32 + 200
    for stage in ("cold", "warm", "augmented_host"):
        assert all(v["img_per_s"] > 0 for v in res[stage].values())
    # the dataset is written once and reused; the timed cache is rebuilt each time
    (marker,) = (tmp_path / ".cache" / "qtl").glob("bench-data-*/.complete")
    written = marker.stat().st_mtime_ns
    again = launch(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert marker.stat().st_mtime_ns == written
