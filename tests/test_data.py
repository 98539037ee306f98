"""Readers, synthetic generator and preprocessing on tiny datasets in the real on-disk formats."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qtl.data import synthetic
from qtl.data.mimic import read_mimic
from qtl.data.nih import LABEL_FILE, read_nih_split
from qtl.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_gray,
    normalize,
    preprocess,
)
from qtl.data.records import DataError
from qtl.labels import ALL_LABELS, CXR8, LABEL_COUNTS, prevalence

TINY = {"train": 40, "val": 12, "test": 12, "external": 16}


# --- helpers: hand-made datasets in the real formats -------------------------------------


def _png(path: Path, value: int = 0, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _nih(root: Path, split: str = "train") -> Path:
    """Three NIH rows; label columns in reverse CXR-19 order, as a real file may differ."""
    rows = [
        {"id": "00000001_000.png", "subj_id": 1, "Effusion": 1, "Hernia": 1},
        {"id": "00000001_001.png", "subj_id": 1},
        {"id": "00000002_000.png", "subj_id": 2, "Atelectasis": 1, "Effusion": 1},
    ]
    header = ["subj_id", "No Finding", *reversed(ALL_LABELS), "id"]
    body = [[r.get(c, 0) for c in header] for r in rows]
    _write_csv(root / LABEL_FILE.format(split=split), header, body)
    for r in rows:
        _png(root / "images" / str(r["id"]))
    return root / LABEL_FILE.format(split=split)


def _mimic(root: Path) -> Path:
    rows = [
        {"dicom_id": "a1", "ViewPosition": "PA", "Pleural Effusion": "1.0", "Atelectasis": ""},
        {"dicom_id": "a2", "ViewPosition": "LATERAL", "Pleural Effusion": "1"},
        {"dicom_id": "a3", "ViewPosition": "AP", "Atelectasis": "1", "Pleural Effusion": "-1"},
        {"dicom_id": "a4", "ViewPosition": "LL", "Atelectasis": "1"},
        {"dicom_id": "a5", "ViewPosition": "AP", "Atelectasis": "0.0", "Pleural Effusion": "0"},
    ]
    for r in rows:
        r.update(subject_id=10000032, study_id=50414267)
        r["path"] = f"files/p10/p10000032/s50414267/{r['dicom_id']}.jpg"
        if r["ViewPosition"] in ("AP", "PA"):  # laterals need no file: the reader drops them
            (root / str(r["path"])).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8)).save(root / str(r["path"]))
    names = [synthetic.MIMIC_NAMES.get(n, n) for n in ALL_LABELS]
    header = ["dicom_id", "subject_id", "study_id", "path", "ViewPosition", *names]
    csv_path = root / "mimic.csv"
    _write_csv(csv_path, header, [[r.get(c, 0) for c in header] for r in rows])
    return csv_path


# --- NIH reader ---------------------------------------------------------------------------


def test_nih_roundtrip_selects_columns_in_requested_order(tmp_path):
    source = _nih(tmp_path)
    split = read_nih_split(tmp_path, "train", ["Effusion", "Atelectasis", "Hernia"])
    assert split.name == "train" and split.source == source
    assert split.ids == ("00000001_000.png", "00000001_001.png", "00000002_000.png")
    assert split.paths[0] == tmp_path / "images" / "00000001_000.png"
    assert split.label_names == ("Effusion", "Atelectasis", "Hernia")
    assert split.labels.dtype == np.float32
    np.testing.assert_array_equal(split.labels, [[1, 0, 1], [0, 0, 0], [1, 1, 0]])
    assert len(split.head(2)) == 2


def test_nih_custom_image_dir(tmp_path):
    _nih(tmp_path)
    (tmp_path / "images").rename(tmp_path / "elsewhere")
    split = read_nih_split(tmp_path, "train", CXR8, image_dir=tmp_path / "elsewhere")
    assert split.paths[2] == tmp_path / "elsewhere" / "00000002_000.png"


def test_missing_root_and_missing_csv(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data=synthetic"):
        read_nih_split(tmp_path / "nowhere", "train", CXR8)
    with pytest.raises(DataError, match=r"miccai2023_nih-cxr-lt_labels_val\.csv.*data=synthetic"):
        read_nih_split(tmp_path, "val", CXR8)


def test_missing_column_names_file_missing_and_found(tmp_path):
    path = tmp_path / LABEL_FILE.format(split="train")
    _write_csv(path, ["id", "Atelectasis"], [["x.png", 0]])
    with pytest.raises(DataError) as err:
        read_nih_split(tmp_path, "train", ["Atelectasis", "Effusion"])
    msg = str(err.value)
    assert str(path) in msg and "['Effusion']" in msg
    assert "columns found: ['id', 'Atelectasis']" in msg


def test_unknown_label(tmp_path):
    _nih(tmp_path)
    with pytest.raises(DataError, match="unknown label.*'Fracture'"):
        read_nih_split(tmp_path, "train", ["Atelectasis", "Fracture"])


def test_bad_cell_value_names_file_line_and_column(tmp_path):
    path = _nih(tmp_path)
    text = path.read_text().splitlines()
    cells = text[2].split(",")
    col = text[0].split(",").index("Mass")
    cells[col] = "2"
    text[2] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError) as err:
        read_nih_split(tmp_path, "train", ["Mass"])
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "'Mass'" in str(err.value)


def test_missing_images_counted_and_listed(tmp_path):
    _nih(tmp_path)
    (tmp_path / "images" / "00000001_001.png").unlink()
    (tmp_path / "images" / "00000002_000.png").unlink()
    with pytest.raises(DataError) as err:
        read_nih_split(tmp_path, "train", CXR8)
    msg = str(err.value)
    assert "2 of 3 images" in msg and "00000001_001.png" in msg and str(tmp_path / "images") in msg
    with pytest.raises(DataError, match="image folder .* does not exist"):
        read_nih_split(tmp_path, "train", CXR8, image_dir=tmp_path / "nope")


# --- MIMIC reader -------------------------------------------------------------------------


def test_mimic_keeps_frontal_and_maps_pleural_effusion(tmp_path):
    split = read_mimic(_mimic(tmp_path), tmp_path, ["Effusion", "Atelectasis"])
    assert split.name == "external"
    assert split.ids == ("a1", "a3", "a5")
    assert split.paths[0] == tmp_path / "files/p10/p10000032/s50414267/a1.jpg"
    # "1.0" counts; "", "-1", "0.0" do not
    np.testing.assert_array_equal(split.labels, [[1, 0], [0, 1], [0, 0]])


def test_mimic_errors(tmp_path):
    csv_path = _mimic(tmp_path)
    with pytest.raises(DataError, match="MIMIC-CXR-JPG root .* does not exist"):
        read_mimic(csv_path, tmp_path / "nope", CXR8)
    with pytest.raises(DataError, match="not found.*data=synthetic"):
        read_mimic(tmp_path / "absent.csv", tmp_path, CXR8)
    (tmp_path / "files/p10/p10000032/s50414267/a3.jpg").unlink()
    with pytest.raises(DataError, match="1 of 3 images .*a3.jpg"):
        read_mimic(csv_path, tmp_path, CXR8)
    _write_csv(tmp_path / "noview.csv", ["dicom_id", "path", "Atelectasis"], [["a1", "x", 1]])
    with pytest.raises(DataError, match=r"noview\.csv lacks the column\(s\) \['ViewPosition'"):
        read_mimic(tmp_path / "noview.csv", tmp_path, ["Atelectasis"])


# --- synthetic generator ------------------------------------------------------------------


def _gen(root: Path, seed: int = 0, **kw) -> Path:
    return synthetic.generate(root, sizes=kw.pop("sizes", TINY), image_px=64, seed=seed, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _gen(tmp_path_factory.mktemp("synth") / "a")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != synthetic.MARKER
    }


def test_generator_writes_the_real_formats(tiny):
    splits = {s: read_nih_split(tiny, s, ALL_LABELS) for s in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [40, 12, 12]
    header = (tiny / LABEL_FILE.format(split="train")).read_text().splitlines()[0].split(",")
    assert header == ["id", *ALL_LABELS, "No Finding", "subj_id"]
    img = Image.open(splits["train"].paths[0])
    assert img.mode == "L" and img.size == (64, 64)
    assert splits["train"].ids[0].endswith("_000.png")
    mimic_csv = tiny / synthetic.MIMIC_DIR / synthetic.MIMIC_CSV
    with mimic_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert "Pleural Effusion" in rows[0] and "Effusion" not in rows[0]
    assert {"LL", "LATERAL"} & {r["ViewPosition"] for r in rows}
    ext = read_mimic(mimic_csv, tiny / synthetic.MIMIC_DIR, ALL_LABELS)
    assert len(ext) == 16 < len(rows)  # the lateral rows were dropped
    assert Image.open(ext.paths[0]).format == "JPEG"
    assert str(ext.paths[0].relative_to(tiny / synthetic.MIMIC_DIR)).startswith("files/p1")
    # No Finding is 1 exactly when no label is
    with (tiny / LABEL_FILE.format(split="val")).open() as f:
        for row in csv.DictReader(f):
            assert int(row["No Finding"]) == int(not any(int(row[n]) for n in ALL_LABELS))


def test_generator_is_deterministic(tiny, tmp_path):
    again = _files(_gen(tmp_path / "b"))
    first = _files(tiny)
    assert again.keys() == first.keys()
    assert all(again[k] == first[k] for k in list(first)[:: max(1, len(first) // 12)])
    assert again == first
    other = _gen(tmp_path / "c", seed=1)
    csv_name = LABEL_FILE.format(split="train")
    assert (other / csv_name).read_bytes() != first[csv_name]
    first_image = read_nih_split(tiny, "train", CXR8).paths[0]
    assert read_nih_split(other, "train", CXR8).paths[0].read_bytes() != first_image.read_bytes()


def test_generator_is_idempotent_and_marker_drives_regeneration(tmp_path):
    root = _gen(tmp_path / "d", sizes={"train": 6, "val": 3, "test": 3, "external": 3})
    csv_path = root / LABEL_FILE.format(split="train")
    image = next((root / "images").iterdir())
    stamps = (csv_path.stat().st_mtime_ns, image.stat().st_mtime_ns)
    t0 = time.perf_counter()
    assert _gen(root, sizes={"train": 6, "val": 3, "test": 3, "external": 3}) == root
    assert time.perf_counter() - t0 < 0.5
    assert (csv_path.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps

    (root / synthetic.MARKER).unlink()  # a crashed or partial dataset: rewritten
    time.sleep(0.01)
    _gen(root, sizes={"train": 6, "val": 3, "test": 3, "external": 3})
    assert csv_path.stat().st_mtime_ns != stamps[0] and (root / synthetic.MARKER).exists()

    _gen(root, sizes={"train": 8, "val": 3, "test": 3, "external": 0})  # new params: replaced
    assert len(read_nih_split(root, "train", CXR8)) == 8
    assert not (root / synthetic.MIMIC_DIR / synthetic.MIMIC_CSV).exists()
    assert not list(tmp_path.glob(".d.*-*"))  # no temp/old folders left behind


def test_generator_failure_leaves_no_complete_dataset(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_mimic_csv", boom)
    with pytest.raises(RuntimeError):
        _gen(tmp_path / "e")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.tmp-*"))


def test_generator_refuses_foreign_folder_and_bad_sizes(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        _gen(tmp_path / "mine")
    with pytest.raises(DataError, match="unknown split"):
        _gen(tmp_path / "f", sizes={"train": 4, "val": 2, "test": 2, "tset": 1})
    with pytest.raises(DataError, match="at least one image"):
        _gen(tmp_path / "f", sizes={"train": 4, "val": 0, "test": 2})


def test_label_prevalences_follow_table_ii_and_co_occur():
    n = 4000
    labels = synthetic.sample_labels(np.random.default_rng(0), n, "train")
    counts = dict(zip(ALL_LABELS, labels.sum(0).tolist(), strict=True))
    for name in ALL_LABELS:
        assert counts[name] == max(3, round(prevalence(name, "train") * n))
    assert max(counts, key=counts.get) == "Infiltration"
    assert counts["Hernia"] <= 10 and counts["Pneumomediastinum"] <= 10
    per_image = labels.sum(1)
    assert (per_image >= 2).mean() > 0.05
    assert 0.4 < (per_image == 0).mean() < 0.75  # NIH: about half the images are "No Finding"
    # correlated pairs co-occur more often than independent labels would
    i, j = ALL_LABELS.index("Effusion"), ALL_LABELS.index("Atelectasis")
    both = (labels[:, i] & labels[:, j]).mean()
    assert both > 1.5 * labels[:, i].mean() * labels[:, j].mean()
    # the external set has the MIMIC mix: cardiomegaly is far more common there
    ext = synthetic.sample_labels(np.random.default_rng(0), n, "mimic")
    k = ALL_LABELS.index("Cardiomegaly")
    assert ext[:, k].mean() > 5 * labels[:, k].mean()
    assert LABEL_COUNTS["Cardiomegaly"]["mimic"] > LABEL_COUNTS["Cardiomegaly"]["train"]


def test_generated_split_counts_match_sampler(tiny):
    split = read_nih_split(tiny, "train", ALL_LABELS)
    expected = synthetic.sample_labels(np.random.default_rng([0, 1, 0]), 40, "train")
    assert split.labels.sum() == expected.sum()


# --- preprocessing ------------------------------------------------------------------------


def test_preprocess_shortest_side_then_centre_crop():
    img = np.random.default_rng(0).integers(0, 256, (100, 60), dtype=np.uint8)
    out = preprocess(img, resize=30, crop=24)
    assert out.shape == (24, 24) and out.dtype == np.uint8
    assert preprocess(img.T, resize=30, crop=24).shape == (24, 24)
    # shortest side already at `resize`: a pure centre crop (offsets as torchvision's)
    img = np.arange(40 * 65, dtype=np.uint32).reshape(40, 65).astype(np.uint8)
    np.testing.assert_array_equal(preprocess(img, 40, 32), img[4:36, 16:48])
    # downsampling a constant keeps it; a half-black/half-white split stays ordered
    np.testing.assert_array_equal(preprocess(np.full((64, 96), 77, np.uint8), 32, 32), 77)
    step = np.zeros((64, 64), np.uint8)
    step[:, 32:] = 200
    out = preprocess(step, 32, 32)
    assert (out[:, :14] == 0).all() and (out[:, 18:] == 200).all()
    with pytest.raises(ValueError):
        preprocess(img, 16, 32)


def test_load_gray_16bit_rgb_and_corrupt(tmp_path):
    ramp = np.linspace(0, 4095, 64 * 32).reshape(32, 64).astype(np.uint16)  # 12 bits used
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    gray = load_gray(tmp_path / "deep.png")
    assert gray.dtype == np.uint8 and gray.shape == (32, 64)
    assert gray.min() == 0 and gray.max() == 255 and (np.diff(gray.ravel()) >= 0).all()

    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[...] = 120
    Image.fromarray(rgb).save(tmp_path / "color.jpg", quality=95)
    out = load_gray(tmp_path / "color.jpg")
    assert out.shape == (16, 24) and out.dtype == np.uint8 and abs(int(out.mean()) - 120) <= 2

    Image.fromarray(rgb[..., 0]).convert("RGBA").save(tmp_path / "alpha.png")
    assert load_gray(tmp_path / "alpha.png").shape == (16, 24)

    good = tmp_path / "good.png"
    _png(good, 5, (32, 32))
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="broken.png"):
        load_gray(tmp_path / "broken.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        load_gray(tmp_path / "text.png")


def test_normalize_maps_to_imagenet_statistics():
    import jax
    import jax.numpy as jnp

    images = jnp.asarray(np.array([[[0, 255]]], np.uint8))
    out = jax.jit(normalize)(images)
    assert out.shape == (1, 1, 2, 3) and out.dtype == jnp.float32
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0, 0], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], (1 - mean) / std, rtol=1e-6)
