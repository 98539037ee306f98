"""mode=predict and mode=export end to end, for both studies: a tiny CXR DQC run and a tiny
MedMNIST QViT run trained here (once per module), images written here (PNG, one DICOM, one
corrupt file), predictions that match the runs' own test predictions, an export whose
predictions equal the run's, and "synthetic" on every record made from synthetic data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose
from PIL import Image

from qtl.apps import one_line
from qtl.apps.export import main as export_main
from qtl.apps.predict import main as predict_main
from qtl.apps.train import train_and_evaluate
from qtl.data.medmnist_info import medmnist_path
from qtl.record.files import RunFiles
from qtl.utils.errors import EXIT_INPUT

pytestmark = pytest.mark.slow


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _probs(row: dict[str, str], names: list[str]) -> np.ndarray:
    return np.array([float(row[f"prob_{n}"]) for n in names])


def _predict(run_dir: Path, images: Path | str, out: Path, *extra: str) -> dict:
    cfg = compose(
        "mode=predict",
        f"predict.run_dir={run_dir}",
        f"predict.images={images}",
        f"predict.out={out}",
        "predict.batch_size=4",  # several batches and a padded last one
        *extra,
    )
    return predict_main(cfg, None)


@pytest.fixture(scope="module")
def cxr_run(synth_root, tmp_path_factory) -> Path:
    """A finished tiny CXR DQC run (one epoch) on the session's synthetic set."""
    run_dir = tmp_path_factory.mktemp("cxr-run") / "run"
    cfg = compose(*TINY, f"data.root={synth_root}", "head=dqc", "train.max_epochs=1")
    train_and_evaluate(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def medmnist_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny MedMNIST QViT run (one epoch) and the folder of its synthetic file."""
    base = tmp_path_factory.mktemp("medmnist-run")
    cfg = compose(
        "debug=tiny_medmnist", "model=qvit", f"data.root={base / 'data'}", "train.max_epochs=1"
    )
    train_and_evaluate(cfg, base / "run")
    return base / "run", base / "data"


def _cxr_images(synth_root: Path, run_dir: Path, folder: Path) -> dict[str, np.ndarray]:
    """Six of the run's test images as PNGs, one of them also as DICOM, and a corrupt file;
    returns the run's own test probabilities per image id."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    labels = json.loads((run_dir / "results.json").read_text())["labels"]
    _, rows = _read_csv(run_dir / "predictions_test.csv")
    folder.mkdir(parents=True)
    expected = {}
    for row in rows[:6]:
        shutil.copy(synth_root / "images" / row["id"], folder / row["id"])
        expected[row["id"]] = _probs(row, labels)
    first = rows[0]["id"]
    pixels = np.asarray(Image.open(folder / first).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "copy.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(folder / "copy.dcm", ds, enforce_file_format=True)
    expected["copy.dcm"] = expected[first]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return expected


def test_cxr_predict_scores_images_as_the_run_did_and_lists_bad_ones(
    cxr_run, synth_root, tmp_path, capsys
):
    results = json.loads((cxr_run / "results.json").read_text())
    assert results["data_source"] == "synthetic"  # a record made from synthetic data says so
    expected = _cxr_images(synth_root, cxr_run, tmp_path / "images")
    out = tmp_path / "pred.csv"
    summary = _predict(cxr_run, tmp_path / "images", out)
    assert summary == {"out": str(out), "images": 8, "unreadable": 1}
    columns, rows = _read_csv(out)
    labels = results["labels"]
    assert columns == ["image", *(f"prob_{x}" for x in labels), "error"]
    by_name = {Path(r["image"]).name: r for r in rows}
    assert sorted(by_name) == sorted([*expected, "broken.png"])  # one row per image
    for name, probs in expected.items():  # the run's preprocessing and best checkpoint
        assert by_name[name]["error"] == ""
        np.testing.assert_allclose(_probs(by_name[name], labels), probs, atol=2e-5)
    broken = by_name["broken.png"]
    assert "broken.png" in broken["error"] and all(broken[f"prob_{x}"] == "" for x in labels)
    printed = capsys.readouterr().out
    assert "7 of 8 image(s) scored" in printed and "synthetic data" in printed
    assert "broken.png" in printed  # listed, not fatal

    # a CSV of paths (relative to the CSV) gives the same rows, in its order
    listing = tmp_path / "images" / "list.csv"
    names = ["copy.dcm", *list(expected)[:2]]
    listing.write_text("path\n" + "".join(f"{n}\n" for n in names))
    _predict(cxr_run, listing, tmp_path / "from_csv.csv")
    _, again = _read_csv(tmp_path / "from_csv.csv")
    assert [Path(r["image"]).name for r in again] == names
    for r in again:
        assert r == {**by_name[Path(r["image"]).name], "image": r["image"]}


def test_cxr_export_loads_without_the_run_and_predicts_the_same(cxr_run, synth_root, tmp_path):
    from safetensors.numpy import load_file

    from qtl.export.load import load_export

    _cxr_images(synth_root, cxr_run, tmp_path / "images")
    folder = export_main(
        compose("mode=export", f"export.run_dir={cxr_run}", f"export.out={tmp_path / 'exp'}"),
        None,
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.safetensors", "config.json", "labels.json", "preprocessing.json",
         "metrics.json", "provenance.json", "export.json", "README.md"]
    )  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "SYNTHETIC" in card.split("\n\n")[1]  # said first, under the title
    assert "not for clinical use" in card and "exact state vector" in card
    assert "dqc head on cxr" in card and "a circuit of" in card  # said by the CXR study
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["data_source"] == "synthetic" and manifest["study"] == "cxr"
    weights = load_file(folder / "model.safetensors")
    assert "head.theta" in weights and any(k.startswith("backbone.") for k in weights)
    prep = json.loads((folder / "preprocessing.json").read_text())
    assert (prep["resize"], prep["crop"], prep["channels"]) == (36, 32, 3)

    # the run folder can go: the export alone predicts, as the run did
    moved = tmp_path / "run-elsewhere"
    shutil.copytree(cxr_run, moved)
    _predict(moved, tmp_path / "images", tmp_path / "from_run.csv")
    shutil.rmtree(moved)
    _predict(folder, tmp_path / "images", tmp_path / "from_export.csv")
    cols, a = _read_csv(tmp_path / "from_run.csv")
    _, b = _read_csv(tmp_path / "from_export.csv")
    assert [r["image"] for r in a] == [r["image"] for r in b]
    probs = [c for c in cols if c.startswith("prob_")]
    for x, y in zip(a, b, strict=True):
        assert x["error"] == y["error"]
        if not x["error"]:
            np.testing.assert_allclose(
                [float(x[c]) for c in probs], [float(y[c]) for c in probs], atol=1e-6
            )
    model = load_export(folder)  # the loader, as someone without the run would use it
    assert model.outputs == json.loads((cxr_run / "results.json").read_text())["labels"]

    with pytest.raises(Exception) as err:  # an export never overwrites a folder with files
        export_main(compose("mode=export", f"export.run_dir={cxr_run}", f"export.out={folder}"))
    assert one_line(err.value)[0] == EXIT_INPUT and "not empty" in str(err.value)


def test_medmnist_predict_and_export_give_the_runs_class_probabilities(
    medmnist_run, tmp_path, capsys
):
    from qtl.report.qvit import main as qvit_table

    run_dir, data = medmnist_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data_source"] == "synthetic" and results["study"] == "medmnist"
    qvit_table([str(run_dir.parent)])
    assert "(synthetic data: every run trained" in capsys.readouterr().out
    with np.load(medmnist_path(data, "retinamnist", 28)) as npz:
        images = npz["test_images"][:5]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):  # RGB 28x28: the run's size, read back unchanged
        Image.fromarray(img).save(folder / f"test_{i}.png")
    (folder / "empty.jpg").write_bytes(b"")
    _predict(run_dir, folder, tmp_path / "run.csv")
    cols, rows = _read_csv(tmp_path / "run.csv")
    assert cols == ["image", *(f"prob_class_{i}" for i in range(5)), "error"]
    _, own = _read_csv(run_dir / "predictions_test.csv")
    by_name = {Path(r["image"]).name: r for r in rows}
    names = [f"class_{i}" for i in range(5)]
    for i in range(5):
        got = _probs(by_name[f"test_{i}.png"], names)
        np.testing.assert_allclose(got, _probs(own[i], names), atol=2e-5)
        assert abs(got.sum() - 1) < 1e-4  # softmax over the five grades
    assert "empty.jpg" in by_name["empty.jpg"]["error"]

    exported = export_main(
        compose("mode=export", f"export.run_dir={run_dir}", f"export.out={tmp_path / 'exp'}"),
        None,
    )
    labels = json.loads((exported / "labels.json").read_text())
    assert labels["outputs"] == names and labels["task"] == "ordinal"
    card = (exported / "README.md").read_text()
    assert "SYNTHETIC" in card and "qvit on MedMNIST" in card and "exact state vector" in card
    _predict(exported, folder, tmp_path / "export.csv")
    _, again = _read_csv(tmp_path / "export.csv")
    for x, y in zip(rows, again, strict=True):
        assert x["image"] == y["image"] and x["error"] == y["error"]
        if not x["error"]:
            np.testing.assert_allclose(_probs(x, names), _probs(y, names), atol=1e-6)


def test_summary_and_report_mark_synthetic_runs(cxr_run, tmp_path, capsys):
    from qtl.config import ReportConfig
    from qtl.report.build import write_report
    from qtl.summary import main as summary_main

    sweep = tmp_path / "sweep"
    job = sweep / "cxr8-dqc" / "seed0"
    job.mkdir(parents=True)
    for name in ("results.json", "metrics.jsonl", "predictions_test.csv"):
        shutil.copy(cxr_run / name, job / name)
    assert summary_main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "trained and tested on qtl's synthetic data" in printed
    assert "test (synthetic data):" in printed
    report = write_report(ReportConfig(sweep=str(sweep), figures=[], auto=False))
    text = report.read_text()
    assert text.splitlines()[0].endswith("(synthetic data)") and "**Synthetic data**" in text
    runs_md = (report.parent / "tables" / "runs.md").read_text()
    assert runs_md.splitlines()[0].endswith("(synthetic data)")
    assert RunFiles(job, create=False).read_results().synthetic


def test_the_model_card_says_how_the_circuits_ran():
    from qtl.export.write import _circuit_sentence

    assert "classical model" in _circuit_sentence(None, {})
    head = {"simulator": "fast"}
    assert "exact state vector" in _circuit_sentence(head, {})
    assert "exact state vector" in _circuit_sentence(head, {"exact": True, "shots": None})
    noisy = _circuit_sentence(head, {"exact": False, "shots": 1000})
    assert "finite shots" in noisy and "exact state vector" not in noisy
    device = _circuit_sentence(head, {"exact": False, "device": {"name": "lightning.qubit"}})
    assert "`lightning.qubit`" in device and "simulator (" not in device
