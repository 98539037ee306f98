"""The MedMNIST reader reads what the synthetic generator writes, for every 2D flag, and names
the file and field of every defect of a bad file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import roc_auc_score

from qtl.data.medmnist import (
    SYNTHETIC_KEY,
    MedMNISTFormatError,
    load_medmnist,
    medmnist_path,
    normalise,
    read_npz,
)
from qtl.data.medmnist_info import FLAGS, INFO, Task, file_name
from qtl.data.medmnist_synthetic import ensure_synthetic, split_sizes, write_synthetic

TINY = {"train": 10, "val": 4, "test": 6}


def test_info_table_carries_the_medmnist_facts():
    assert len(FLAGS) == 12
    assert INFO["chestmnist"].task == Task.multi_label and INFO["chestmnist"].label_columns == 14
    assert INFO["retinamnist"].task == Task.ordinal and INFO["retinamnist"].n_classes == 5
    assert INFO["pathmnist"].splits == {"train": 89996, "val": 10004, "test": 7180}
    assert [f for f in FLAGS if INFO[f].channels == 3] == [
        "pathmnist",
        "dermamnist",
        "retinamnist",
        "bloodmnist",
    ]
    assert file_name("bloodmnist", 28) == "bloodmnist.npz"
    assert file_name("bloodmnist", 224) == "bloodmnist_224.npz"
    with pytest.raises(ValueError, match="data.size=32"):
        file_name("bloodmnist", 32)


@pytest.mark.parametrize("flag", FLAGS)
def test_reader_reads_what_the_generator_writes(tmp_path, flag):
    info = INFO[flag]
    path = write_synthetic(tmp_path, flag, 28, sizes=TINY, seed=3)
    assert path == tmp_path / f"{flag}.npz"
    data = load_medmnist(tmp_path, flag, 28)
    assert data.synthetic["seed"] == 3 and data.image_shape == (28, 28, info.channels)
    with np.load(path) as raw:  # the stored layout is MedMNIST's own (gray: N x H x W)
        assert raw["train_images"].ndim == (3 if info.channels == 1 else 4)
        assert raw["train_labels"].dtype == np.uint8
    for split, n in TINY.items():
        s = data.splits[split]
        assert s.images.shape == (n, 28, 28, info.channels) and s.images.dtype == np.uint8
        assert s.labels.shape == (n, info.label_columns)
        top = 1 if info.task == Task.multi_label else info.n_classes - 1
        assert s.labels.min() >= 0 and s.labels.max() <= top
    x = normalise(data.splits["val"].images)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0


def test_generator_is_deterministic_per_seed_and_sizes_are_capped(tmp_path):
    a = write_synthetic(tmp_path / "a", "dermamnist", 28, sizes=TINY, seed=1)
    b = write_synthetic(tmp_path / "b", "dermamnist", 28, sizes=TINY, seed=1)
    c = write_synthetic(tmp_path / "c", "dermamnist", 28, sizes=TINY, seed=2)
    with np.load(a) as fa, np.load(b) as fb, np.load(c) as fc:
        np.testing.assert_array_equal(fa["test_images"], fb["test_images"])
        assert not np.array_equal(fa["test_images"], fc["test_images"])
    assert split_sizes("breastmnist") == {"train": 546, "val": 78, "test": 156}
    assert split_sizes("pathmnist") == {"train": 1000, "val": 200, "test": 400}
    # the test split does not depend on how large the train split is
    d = write_synthetic(tmp_path / "d", "dermamnist", 28, sizes={**TINY, "train": 30}, seed=1)
    with np.load(a) as fa, np.load(d) as fd:
        np.testing.assert_array_equal(fa["test_images"], fd["test_images"])


def test_larger_sizes_use_medmnist_file_names(tmp_path):
    write_synthetic(tmp_path, "pneumoniamnist", 64, sizes=TINY)
    data = load_medmnist(tmp_path, "pneumoniamnist", 64)
    assert data.path.name == "pneumoniamnist_64.npz"
    assert data.splits["train"].images.shape == (10, 64, 64, 1)
    with pytest.raises(FileNotFoundError, match="medmnist_synthetic --root"):
        load_medmnist(tmp_path, "pneumoniamnist", 128)


def test_ensure_synthetic_reuses_rewrites_and_never_touches_a_real_file(tmp_path):
    path = ensure_synthetic(tmp_path, "octmnist", 28, sizes=TINY, seed=0)
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    assert ensure_synthetic(tmp_path, "octmnist", 28, sizes=TINY, seed=0).stat().st_mtime_ns == (
        stamp - 10**9
    )
    ensure_synthetic(tmp_path, "octmnist", 28, sizes=TINY, seed=1)
    assert load_medmnist(tmp_path, "octmnist").synthetic["seed"] == 1
    real = _arrays("octmnist", TINY)
    _save(path, real)  # no marker: a real file
    ensure_synthetic(tmp_path, "octmnist", 28, sizes=TINY, seed=5)
    with np.load(path) as f:
        assert SYNTHETIC_KEY not in f.files
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


# ----------------------------------------------------------------------------- bad files


def _arrays(flag: str, sizes: dict[str, int], size: int = 28) -> dict[str, np.ndarray]:
    info = INFO[flag]
    rng = np.random.default_rng(0)
    out = {}
    for split, n in sizes.items():
        shape = (n, size, size) if info.channels == 1 else (n, size, size, 3)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        top = 2 if info.task == Task.multi_label else info.n_classes
        out[f"{split}_labels"] = rng.integers(0, top, (n, info.label_columns)).astype(np.uint8)
    return out


def _save(path, arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _bad(tmp_path, flag: str, edit, **kw):
    arrays = _arrays(flag, TINY)
    arrays[SYNTHETIC_KEY] = np.asarray(json.dumps({"seed": 0}))
    edit(arrays)
    path = medmnist_path(tmp_path, flag, 28)
    _save(path, arrays)
    with pytest.raises(MedMNISTFormatError) as err:
        read_npz(path, flag, 28, **kw)
    assert str(path) in str(err.value)
    return err.value


def test_a_good_hand_written_file_passes(tmp_path):
    arrays = _arrays("retinamnist", TINY)
    path = tmp_path / "retinamnist.npz"
    _save(path, arrays)
    data = read_npz(path, "retinamnist", 28, check_split_sizes=False)
    assert data.synthetic is None and len(data.splits["test"]) == 6


def test_missing_key_is_named(tmp_path):
    err = _bad(tmp_path, "bloodmnist", lambda a: a.pop("val_labels"))
    assert err.field == "val_labels" and "missing" in str(err)


def test_wrong_image_dtype_is_named(tmp_path):
    def edit(a):
        a["train_images"] = a["train_images"].astype(np.float32)

    err = _bad(tmp_path, "bloodmnist", edit)
    assert err.field == "train_images" and "float32, expected uint8" in str(err)


def test_gray_images_for_an_rgb_flag_are_named(tmp_path):
    def edit(a):
        a["test_images"] = a["test_images"][..., 0]

    err = _bad(tmp_path, "dermamnist", edit)
    assert err.field == "test_images" and "3 channels" in str(err)


def test_rgb_images_for_a_gray_flag_are_named(tmp_path):
    def edit(a):
        a["val_images"] = np.repeat(a["val_images"][..., None], 3, -1)

    err = _bad(tmp_path, "organamnist", edit)
    assert err.field == "val_images" and "1 channel" in str(err)


def test_label_out_of_range_is_named(tmp_path):
    def edit(a):
        a["train_labels"][3, 0] = 5  # RetinaMNIST grades are 0..4

    err = _bad(tmp_path, "retinamnist", edit)
    assert err.field == "train_labels" and "label value 5 out of range" in str(err)


def test_multi_label_values_must_be_zero_or_one(tmp_path):
    def edit(a):
        a["test_labels"][0, 13] = 2

    err = _bad(tmp_path, "chestmnist", edit)
    assert err.field == "test_labels" and "0/1 per label" in str(err)


def test_label_columns_and_row_counts_are_checked(tmp_path):
    def one_column(a):
        a["train_labels"] = a["train_labels"][:, :1]

    assert "expected (N, 14)" in str(_bad(tmp_path, "chestmnist", one_column))

    def short(a):
        a["val_labels"] = a["val_labels"][:-1]

    err = _bad(tmp_path, "pathmnist", short)
    assert err.field == "val_labels" and "3 rows but val_images has 4" in str(err)


def test_image_size_must_match_the_file_size(tmp_path):
    def small(a):
        a["train_images"] = a["train_images"][:, :20, :20]

    assert "expected 28x28" in str(_bad(tmp_path, "pathmnist", small))


def test_real_files_must_have_the_official_split_sizes(tmp_path):
    def unmark(a):
        a.pop(SYNTHETIC_KEY)

    err = _bad(tmp_path, "breastmnist", unmark)
    assert err.field == "train_images" and "official train split has 546" in str(err)


def test_not_an_npz_is_named(tmp_path):
    path = tmp_path / "pathmnist.npz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(MedMNISTFormatError, match="field 'file'"):
        load_medmnist(tmp_path, "pathmnist")
    with pytest.raises(ValueError, match="not a MedMNIST 2D set"):
        load_medmnist(tmp_path, "mnist")


# ----------------------------------------------------------------------------- learnable


@pytest.mark.parametrize(
    "flag,floor",
    [("retinamnist", 0.3), ("pathmnist", 0.4), ("breastmnist", 0.7), ("chestmnist", 0.7)],
)
def test_synthetic_classes_are_learnable_from_pixels(tmp_path, flag, floor):
    """A linear model on raw pixels beats chance clearly: the structure is there."""
    write_synthetic(tmp_path, flag, 28, sizes={"train": 300, "val": 4, "test": 200})
    data = load_medmnist(tmp_path, flag)
    tr, te = data.splits["train"], data.splits["test"]
    x, xt = normalise(tr.images).reshape(len(tr), -1), normalise(te.images).reshape(len(te), -1)
    if data.info.task == Task.multi_label:
        aucs = [
            roc_auc_score(te.labels[:, j], _fit(x, tr.labels[:, j]).decision_function(xt))
            for j in range(4)  # the four most prevalent labels
        ]
        assert np.mean(aucs) > floor
        return
    acc = float((_fit(x, tr.labels[:, 0]).predict(xt) == te.labels[:, 0]).mean())
    chance = np.bincount(te.labels[:, 0]).max() / len(te)
    assert acc > max(floor, chance + 0.1), (acc, chance)


def _fit(x, y):
    return RidgeClassifier(alpha=100.0).fit(x, y)  # closed form: fast, unlike an iterative fit


def test_data_group_gives_the_reader_its_config_and_opens_a_synthetic_set(tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.medmnist of the machine's user

    from helpers import compose

    from qtl.data.medmnist import MedMNISTConfig, medmnist_config, open_medmnist

    run = compose("data=medmnist", "model=qvit", f"paths.data_dir={tmp_path / 'data'}")
    cfg = medmnist_config(run.data, tmp_path / "data")
    assert cfg == MedMNISTConfig(root=str(tmp_path / "data" / "medmnist"))
    # data=medmnist reads real files only; the synthetic stand-in is asked for (the demo's)
    cfg = replace(
        cfg, root=str(tmp_path / "files"), flag="bloodmnist", synth_sizes=TINY, synthetic=True
    )
    data = open_medmnist(cfg)
    assert data.path == tmp_path / "files" / "bloodmnist.npz" and len(data.splits["val"]) == 4
    with pytest.raises(FileNotFoundError):
        open_medmnist(replace(cfg, flag="octmnist", synthetic=False))


def test_real_files_are_looked_for_in_data_root_then_the_package_folder(tmp_path, monkeypatch):
    """data.synthetic=false: data.root first, then ~/.medmnist (the medmnist package's own
    folder); a synthetic file met on the way is passed over, never trained on."""
    from dataclasses import replace

    from qtl.data.medmnist import MedMNISTConfig, MedMNISTMissing, open_medmnist, package_root
    from qtl.data.medmnist_info import SYNTHETIC_KEY

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert package_root() == tmp_path / "home" / ".medmnist"
    root = tmp_path / "root"
    cfg = MedMNISTConfig(root=str(root), flag="breastmnist", synthetic=False)

    def real(folder):  # a synthetic file's arrays without its marker: as a real file
        src = write_synthetic(
            tmp_path / "src", "breastmnist", 28, sizes=TINY, seed=len(str(folder))
        )
        with np.load(src) as npz:
            arrays = {k: npz[k] for k in npz.files if k != SYNTHETIC_KEY}
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "breastmnist.npz", **arrays)
        return arrays

    write_synthetic(root, "breastmnist", 28, sizes=TINY)  # a stand-in under data.root
    with pytest.raises(MedMNISTMissing, match="synthetic stand-in, not used"):
        open_medmnist(cfg)
    assert open_medmnist(replace(cfg, synthetic=True)).synthetic is not None  # when asked for

    home = real(package_root())
    data = open_medmnist(replace(cfg, check_split_sizes=False))
    assert data.path == package_root() / "breastmnist.npz" and data.synthetic is None
    np.testing.assert_array_equal(data.splits["test"].images[..., 0], home["test_images"])

    (root / "breastmnist.npz").unlink()
    mine = real(root)  # a real file under data.root comes first
    data = open_medmnist(replace(cfg, check_split_sizes=False))
    assert data.path == root / "breastmnist.npz"
    np.testing.assert_array_equal(data.splits["test"].images[..., 0], mine["test_images"])
