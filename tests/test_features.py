"""The frozen-backbone feature cache: stored whole, resumed after a kill, shared, reused; a
head trained on it predicts what the same frozen model trained on images predicts."""

from __future__ import annotations

import csv
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, compose, launch

from qtl.config import ConfigError, validate
from qtl.data.features import (
    CorruptChunk,
    decode_chunk,
    encode_chunk,
    features_for,
)
from qtl.studies import study_for
from qtl.utils import faults

PARTS = {"format": 1, "backbone": "b" * 8, "dtype": "float16"}


def _fake(rows: int = 50, width: int = 6):
    """A split of ``rows`` tiny 'images' and an embed that counts the images it sees."""
    images = np.arange(rows * 4, dtype=np.uint8).reshape(rows, 2, 2)
    seen: list[int] = []
    calls = {"images_for": 0}

    def embed(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return np.repeat(x.reshape(len(x), -1).astype(np.float32).sum(1, keepdims=True), width, 1)

    def images_for():
        calls["images_for"] += 1
        return images, {}

    return images, embed, images_for, seen, calls


def _fill(directory: Path, embed, images_for, **kw):
    args = {"width": 6, "chunk": 16, "batch_size": 8, "level": 3} | kw
    return features_for(directory, PARTS, images_for=images_for, embed=embed, **args)


def test_chunk_round_trip_and_damage_is_refused():
    x = np.random.default_rng(0).random((5, 7)).astype(np.float16)
    for level in (0, 3):
        blob = encode_chunk(x, level)
        np.testing.assert_array_equal(decode_chunk(blob, "float16", (5, 7)), x)
    with pytest.raises(CorruptChunk, match="checksum|undecodable"):
        decode_chunk(blob[:-3] + b"\0\0\0", "float16", (5, 7))
    with pytest.raises(CorruptChunk, match="does not match"):
        decode_chunk(blob, "float32", (5, 7))  # written as float16
    with pytest.raises(CorruptChunk, match="magic"):
        decode_chunk(b"\x80\x04pickle", "float16", (5, 7))


def test_killed_fill_keeps_its_chunks_and_the_rerun_computes_only_the_rest(tmp_path, monkeypatch):
    images, embed, images_for, seen, calls = _fake()
    monkeypatch.setenv("QTL_FAULT", "feature_chunk@2")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        _fill(tmp_path, embed, images_for)
    assert sorted(p.name for p in tmp_path.glob("chunk-*")) == [
        "chunk-00000.qtlf",
        "chunk-00001.qtlf",
    ]
    assert not (tmp_path / "manifest.json").exists()  # not complete: no reader trusts it
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("chunk-*")}
    monkeypatch.delenv("QTL_FAULT")
    seen.clear()
    fs = _fill(tmp_path, embed, images_for)
    assert fs.computed == 50 - 32 and fs.cached == 32
    assert sum(seen) == 8 * 3  # chunks 2 (16 rows) and 3 (2 rows, one padded batch)
    for name, stamp in kept.items():
        p = tmp_path / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp  # finished chunks untouched
    want = images.reshape(50, -1).sum(1).astype(np.float16)
    np.testing.assert_array_equal(fs.features[:, 0], want)
    # complete: read back without the images
    seen.clear()
    calls["images_for"] = 0
    again = _fill(tmp_path, embed, images_for)
    assert (seen, calls["images_for"], again.computed) == ([], 0, 0)
    np.testing.assert_array_equal(again.features, fs.features)


def test_a_damaged_chunk_is_recomputed(tmp_path):
    _, embed, images_for, seen, _ = _fake()
    first = _fill(tmp_path, embed, images_for)
    (tmp_path / "chunk-00001.qtlf").write_bytes(b"QTLF garbage")
    seen.clear()
    with pytest.warns(UserWarning, match="chunk-00001.qtlf is unusable"):
        fs = _fill(tmp_path, embed, images_for)
    assert fs.computed == 16 and sum(seen) == 16
    np.testing.assert_array_equal(fs.features, first.features)


def test_concurrent_fills_compute_once(tmp_path):
    images, embed, images_for, seen, _ = _fake()
    gate = threading.Barrier(2)

    def slow(x):
        threading.Event().wait(0.01)
        return embed(x)

    results = []

    def run():
        gate.wait()
        results.append(_fill(tmp_path, slow, images_for))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(seen) == 56  # 50 rows in padded batches of 8, once: the other run read them
    assert sorted(r.computed for r in results) == [0, 50]
    np.testing.assert_array_equal(results[0].features, results[1].features)


def test_config_refuses_what_cannot_be_cached():
    validate(compose(*TINY, "experiment=frozen"))
    with pytest.raises(ConfigError, match="data.augment=false"):
        validate(compose(*TINY, "experiment=frozen", "data.augment=true"))
    with pytest.raises(ConfigError, match="backbone.freeze=true"):
        validate(compose(*TINY, "experiment=frozen", "backbone.freeze=false"))
    with pytest.raises(ConfigError, match="batch_norm=inference"):
        validate(compose(*TINY, "experiment=frozen", "backbone.batch_norm=batch"))
    medmnist = compose("data=medmnist", "model=qvit", "features.cache=true")
    with pytest.raises(ConfigError, match="features.cache=true has no meaning in the medmnist"):
        study_for(medmnist).validate(medmnist)


def test_backbone_digest_follows_the_arrays_not_the_name():
    from qtl.models.classifier import build_model
    from qtl.train.features import backbone_digest

    cfg = compose(*TINY, "backbone.pretrained=null")
    a, b = build_model(cfg, 0).backbone, build_model(cfg, 0).backbone
    assert backbone_digest(a) == backbone_digest(b)
    assert backbone_digest(build_model(cfg, 1).backbone) != backbone_digest(a)  # random init
    kernel = a.embedder.embedder.convolution.kernel
    kernel.value = kernel.value.at[0, 0, 0, 0].add(1e-3)
    assert backbone_digest(a) != backbone_digest(b)


def _predictions(run_dir: Path, split: str) -> np.ndarray:
    with (run_dir / f"predictions_{split}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])


@pytest.mark.slow
def test_head_on_features_equals_frozen_model_on_images(synth_root, tmp_path):
    """Extraction killed (SIGKILL) and resumed, a training run reusing it untouched, and its
    predictions against a frozen image run of the same seed."""
    feats = tmp_path / "features"
    common = [*TINY, f"data.root={synth_root}", f"paths.feature_cache={feats}", "head=cdl"]
    frozen = [*common, "experiment=frozen", "features.dtype=float32", "features.chunk=16"]
    env = {"QTL_FAULT": "feature_chunk@3"}
    killed = launch("mode=features", *frozen, cwd=Path.cwd(), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(feats.glob("*/chunk-*"))) == 3 and not list(feats.glob("*/manifest.json"))
    resumed = launch("mode=features", *frozen, cwd=Path.cwd())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "features train: 96 vectors of 16 (float32), 48 computed now, 48 were cached" in (
        resumed.stdout
    )
    stamps = {p: p.stat().st_mtime_ns for p in feats.glob("*/chunk-*")}

    from qtl.apps.train import train_and_evaluate

    feat_dir, img_dir = tmp_path / "on-features", tmp_path / "on-images"
    res = train_and_evaluate(compose(*frozen), feat_dir)
    assert {p: p.stat().st_mtime_ns for p in feats.glob("*/chunk-*")} == stamps  # reused
    images = [*common, "backbone.freeze=true", "data.augment=false"]
    ref = train_and_evaluate(compose(*images), img_dir)
    assert res["split_sizes"] == ref["split_sizes"] and res["best_epoch"] == ref["best_epoch"]
    for split in ("val", "test", "external"):
        np.testing.assert_allclose(
            _predictions(feat_dir, split), _predictions(img_dir, split), atol=2e-5, rtol=0
        )
        assert abs(res["auroc"][split]["mean"] - ref["auroc"][split]["mean"]) < 1e-3
    # killed right after an epoch's commit, it resumes and ends as the uninterrupted run
    os.environ.update(QTL_FAULT="after_last_save@1", QTL_FAULT_ACTION="raise")
    faults.reset()
    try:
        with pytest.raises(faults.InjectedFault):
            train_and_evaluate(compose(*frozen), tmp_path / "resumed")
    finally:
        del os.environ["QTL_FAULT"], os.environ["QTL_FAULT_ACTION"]
    train_and_evaluate(compose(*frozen), tmp_path / "resumed")
    for split in ("val", "test"):
        np.testing.assert_array_equal(
            _predictions(tmp_path / "resumed", split), _predictions(feat_dir, split)
        )
    # an ordinary run: a rerun reports it finished; checkpoints hold the head only
    assert train_and_evaluate(compose(*frozen), feat_dir) == res
    size = sum(f.stat().st_size for f in (feat_dir / "checkpoints").rglob("*") if f.is_file())
    ref_size = sum(f.stat().st_size for f in (img_dir / "checkpoints").rglob("*") if f.is_file())
    assert size < ref_size
    assert os.path.exists(ROOT / "conf" / "experiment" / "frozen.yaml")
