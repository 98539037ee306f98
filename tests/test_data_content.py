"""A run names its data by content, not by path: the data may move (a node's scratch disk) and
its runs still resume without training anything again, while one changed label refuses the
run directory, naming the file. Both studies: NIH-CXR-LT-format CSVs + image folder (+ the
MIMIC-CXR-LT external set), and a MedMNIST ``.npz``. Records written by the previous release
(tests/data/records_v3: identity with the data's paths, no content; written by
``launch.py debug=tiny head=cdl backbone.pretrained=null data=nih_cxr_lt data.root=data/nih
...`` and ``launch.py debug=tiny_medmnist model=qvit data.root=data/medmnist`` of that qtl)
resume at their paths and are upgraded; moved data is then free to move."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import compose

from qtl.config import ConfigError
from qtl.data.content import cxr_digests, file_digest, image_manifest, npz_digests
from qtl.record.identity import RECORD_VERSION, check_run_dir, fingerprint, identity
from qtl.studies import study_for

RECORDS = Path(__file__).parent / "data" / "records_v3"
TINY_SIZES = {"train": 96, "val": 48, "test": 48, "external": 40}


@pytest.fixture(scope="module")
def _cxr_source(tmp_path_factory) -> Path:
    """The debug=tiny synthetic set in the NIH-CXR-LT / MIMIC-CXR-LT formats, written once."""
    from qtl.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("nih"), sizes=TINY_SIZES, image_px=48, seed=0)


@pytest.fixture
def cxr_data(_cxr_source):
    """``cxr_data(root)``: a copy of that set at ``root`` (a test may move and edit it)."""

    def copy_to(root: Path) -> Path:
        shutil.copytree(_cxr_source, root)
        return Path(root)

    return copy_to


def _cxr(root: Path, *extra: str):
    return compose(
        "debug=tiny",
        "head=cdl",
        "backbone.pretrained=null",
        "data=nih_cxr_lt",
        f"data.root={root}",
        f"data.external_csv={root}/mimic/mimic-cxr-lt_test.csv",
        f"data.external_root={root}/mimic",
        *extra,
    )


def _qvit(root: Path, *extra: str):
    return compose("debug=tiny_medmnist", "model=qvit", f"data.root={root}", *extra)


def _flip_first_label(csv_path: Path) -> None:
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    col = rows[0].index("Atelectasis")
    rows[1][col] = "1" if rows[1][col] == "0" else "0"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    csv_path.write_text(out.getvalue())


def _flip_first_npz_label(path: Path) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays["train_labels"].copy()
    labels[0, 0] = (labels[0, 0] + 1) % 5  # RetinaMNIST: 5 grades
    arrays["train_labels"] = labels
    np.savez(path, **arrays)


# --- the digests --------------------------------------------------------------------------------


def test_digests_are_cached_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("id,a\nx,0\n")
    cache = tmp_path / "cache"
    first = file_digest(f, cache)
    assert len(list(cache.iterdir())) == 1
    entry = next(cache.iterdir())
    saved = json.loads(entry.read_text())
    saved["value"] = "from-the-cache"  # proves the second call reads the entry, not the file
    entry.write_text(json.dumps(saved))
    assert file_digest(f, cache) == "from-the-cache"
    f.write_text("id,a\nx,1\n")  # rewritten: another mtime and content, computed again
    assert file_digest(f, cache) not in (first, "from-the-cache")
    assert file_digest(f, None) == file_digest(f, cache)
    entry.write_text("{not json")  # a damaged entry is only a slower start
    assert file_digest(f, cache) == file_digest(f, None)


def test_the_image_manifest_names_sizes_not_bytes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in (("a.png", b"12345"), ("b.png", b"xy")):
        (folder / name).write_bytes(data)

    def listing():
        return [folder / "b.png", folder / "a.png", folder / "missing.png"]

    first = image_manifest(folder, listing)
    assert image_manifest(folder, lambda: list(reversed(listing()))) == first  # sorted
    (folder / "a.png").write_bytes(b"54321")  # same size, other bytes: not read
    assert image_manifest(folder, listing) == first
    (folder / "a.png").write_bytes(b"123456")
    assert image_manifest(folder, listing) != first
    calls = []
    cache = tmp_path / "cache"
    image_manifest(folder, lambda: calls.append(1) or listing(), cache, key="labels")
    image_manifest(folder, lambda: calls.append(1) or listing(), cache, key="labels")
    assert calls == [1]  # the second run does not list the images again


def test_cxr_content_follows_the_labels_not_the_folder(tmp_path, cxr_data):
    a = cxr_data(tmp_path / "a")
    cfg = _cxr(a)
    before = cxr_digests(cfg.data, cfg.task.labels, tmp_path / "cache")
    assert set(before) == {
        "labels_train",
        "labels_val",
        "labels_test",
        "images",
        "external_labels",
        "external_images",
    }
    b = tmp_path / "b"
    shutil.copytree(a, b)
    moved = _cxr(b)
    assert cxr_digests(moved.data, moved.task.labels, tmp_path / "cache") == before
    _flip_first_label(b / "miccai2023_nih-cxr-lt_labels_val.csv")
    changed = cxr_digests(moved.data, moved.task.labels, tmp_path / "cache")
    assert {k for k in before if before[k] != changed[k]} == {"labels_val"}
    (b / "images" / sorted(p.name for p in (b / "images").iterdir())[0]).unlink()
    assert cxr_digests(moved.data, moved.task.labels, None)["images"] != before["images"]
    # generated data: its settings (identity fields) are its content
    assert cxr_digests(compose("debug=tiny").data, ["Atelectasis"], None) == {}


def test_npz_content_reads_labels_and_the_zip_directory(tmp_path):
    path = tmp_path / "x.npz"
    images = np.zeros((4, 2, 2), np.uint8)
    np.savez(path, train_images=images, train_labels=np.zeros((4, 1), np.uint8))
    first = npz_digests(path)
    np.savez(path, train_images=images, train_labels=np.ones((4, 1), np.uint8))
    second = npz_digests(path)
    assert second["labels"] != first["labels"] and second["images"] == first["images"]
    np.savez(path, train_images=images + 1, train_labels=np.ones((4, 1), np.uint8))
    assert npz_digests(path)["images"] != second["images"]
    with zipfile.ZipFile(path) as zf:
        assert "train_images.npy" in zf.namelist()


# --- a run's identity ---------------------------------------------------------------------------


def test_paths_are_not_identity_the_content_is(tmp_path, cxr_data):
    a = cxr_data(tmp_path / "a")
    cfg = _cxr(a)
    ident = identity(cfg, study_for(cfg))
    assert not {"data.root", "data.image_dir", "data.external_csv", "data.external_root"} & set(
        ident
    )
    assert ident["data.content.labels_train"] == file_digest(
        a / "miccai2023_nih-cxr-lt_labels_train.csv"
    )
    q = _qvit(tmp_path / "m")
    qident = identity(q, study_for(q))
    assert "data.root" not in qident and {"data.content.labels", "data.content.images"} <= set(
        qident
    )


def test_a_dropped_external_set_is_a_difference(tmp_path, cxr_data):
    a = cxr_data(tmp_path / "a")
    cfg = _cxr(a, f"paths.root={tmp_path}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "run_config.json"
    study = study_for(cfg)
    check_run_dir(copy.deepcopy(cfg), run_dir, path, study=study, provenance=dict)
    without = _cxr(a, f"paths.root={tmp_path}", "data.external_csv=null", "data.external_root=null")
    with pytest.raises(ConfigError, match=r"data\.content\.external_labels: .* there, absent now"):
        check_run_dir(without, run_dir, path, study=study, provenance=dict)


# --- moving the data and changing a label, on real runs -----------------------------------------


def _train(cfg, run_dir: Path) -> dict:
    from qtl.train.driver import train_and_evaluate

    return train_and_evaluate(copy.deepcopy(cfg), run_dir, study_for(cfg))


def _moved_run_resumes_and_a_changed_label_is_refused(
    tmp_path, capsys, make_cfg, data: Path, label_file: str, flip, differing: str
):
    run_dir = tmp_path / "run"
    first = _train(make_cfg(data), run_dir)
    metrics = (run_dir / "metrics.jsonl").read_text()
    record = (run_dir / "run_config.json").read_text()
    moved = tmp_path / "scratch" / "data"
    moved.parent.mkdir()
    shutil.move(data, moved)
    # finished: reported from the new place, nothing trains
    capsys.readouterr()
    again = _train(make_cfg(moved), run_dir)
    assert "finished already" in capsys.readouterr().out
    assert again == first
    # interrupted after its last epoch (results.json not yet written): resumes from the
    # checkpoint at the new place, trains no epoch, gives the same results
    (run_dir / "results.json").unlink()
    resumed = _train(make_cfg(moved), run_dir)
    out = capsys.readouterr().out
    assert "resuming" in out
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    for key in ("auroc", "metrics", "best_epoch", "epochs", "fingerprint", "loss"):
        assert resumed[key] == first[key], key
    assert (
        json.loads((run_dir / "run_config.json").read_text())["identity"]
        == json.loads(record)["identity"]
    )
    if label_file.endswith(".npz"):  # as a KD teacher (distill.teacher=<run dir>) it still
        # matches a student on the moved data: compared by the content its record holds
        from omegaconf import OmegaConf

        from qtl.config import to_schema
        from qtl.train.teacher import _data_keys

        teacher = to_schema(OmegaConf.create(first["config"]))
        student, theirs = _data_keys(make_cfg(moved), teacher, run_dir)
        assert student == theirs and "root" not in student
    # one label changed: refused, naming the file's key; nothing in the run is touched
    flip(moved / label_file)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=differing) as err:
        _train(make_cfg(moved), run_dir)
    assert "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_cxr_data_moves_and_a_changed_label_is_refused(tmp_path, capsys, cxr_data):
    data = cxr_data(tmp_path / "nih")
    _moved_run_resumes_and_a_changed_label_is_refused(
        tmp_path,
        capsys,
        lambda root: _cxr(root, f"paths.root={tmp_path}"),
        data,
        "miccai2023_nih-cxr-lt_labels_train.csv",
        _flip_first_label,
        r"data\.content\.labels_train: '[0-9a-f]+' there, '[0-9a-f]+' now",
    )


def test_medmnist_data_moves_and_a_changed_label_is_refused(tmp_path, capsys):
    data = tmp_path / "medmnist"
    _moved_run_resumes_and_a_changed_label_is_refused(
        tmp_path,
        capsys,
        lambda root: _qvit(root, f"paths.root={tmp_path}"),
        data,
        "retinamnist.npz",
        _flip_first_npz_label,
        r"data\.content\.labels: '[0-9a-f]+' there, '[0-9a-f]+' now",
    )


# --- records of the previous release (version 3: data named by path) ----------------------------


@pytest.mark.parametrize("name", ["cxr8-cdl", "retinamnist-qvit"])
def test_a_previous_record_resumes_at_its_paths_and_then_may_move(
    tmp_path, monkeypatch, cxr_data, name
):
    monkeypatch.chdir(tmp_path)  # the records name data/nih and data/medmnist, relative
    run_dir = tmp_path / "run"
    shutil.copytree(RECORDS / name, run_dir)
    path = run_dir / "run_config.json"
    old = json.loads(path.read_text())
    assert old["record_version"] == 3 and "data.root" in old["identity"]
    if name == "cxr8-cdl":
        cxr_data(tmp_path / "data" / "nih")

        def make(root):
            return compose(
                "debug=tiny",
                "head=cdl",
                "backbone.pretrained=null",
                "data=nih_cxr_lt",
                f"data.root={root}",
                f"data.external_csv={root}/mimic/mimic-cxr-lt_test.csv",
                f"data.external_root={root}/mimic",
            )
    else:

        def make(root):
            return _qvit(root)

    cfg = make("data/nih" if name == "cxr8-cdl" else "data/medmnist")
    study = study_for(cfg)
    cfg.data.augment_on = type(cfg.data.augment_on)(old["identity"]["data.augment_on"])
    # the key that release gave (teacher folders are found under it)
    assert fingerprint(cfg, study, by_path=True) == old["fingerprint"]
    # the data moved before the record knew its content: refused, saying what to do
    shutil.copytree(
        "data/nih" if name == "cxr8-cdl" else _medmnist_dir(cfg), tmp_path / "elsewhere"
    )
    with pytest.raises(
        ConfigError, match=r"data\.root: .*names the data by path, so the run is found only"
    ):
        check_run_dir(
            make(str(tmp_path / "elsewhere")), run_dir, path, study=study, provenance=dict
        )
    assert json.loads(path.read_text()) == old
    # at its own paths it resumes, and the record is upgraded with the data's content
    check_run_dir(copy.deepcopy(cfg), run_dir, path, study=study, provenance=dict)
    now = json.loads(path.read_text())
    assert now["record_version"] == RECORD_VERSION
    assert any(k.startswith("data.content.") for k in now["identity"])
    assert "data.root" not in now["identity"]
    assert now["upgrades"][-1]["identity_before"] == old["identity"]
    # from now on the data may move
    check_run_dir(make(str(tmp_path / "elsewhere")), run_dir, path, study=study, provenance=dict)


def _medmnist_dir(cfg) -> str:
    study = study_for(cfg)
    study.data_content(cfg)  # writes the synthetic file there, as the run did
    return cfg.data.root
