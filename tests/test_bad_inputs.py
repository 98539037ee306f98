"""Every bad input is one line and exit 2: each error class qtl defines is part of one mapping
(found by walking qtl's modules, not listed by hand), and a table of bad config values and
bad data files - each given to the code that reads it - ends in that mapping, naming the
field or the file. A few real ``launch.py`` runs prove the line, the status, the absent
traceback, and that nothing already computed was removed."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import pkgutil
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose, launch

import hydra_plugins
import qtl
from qtl.apps import dispatch, one_line
from qtl.config import DataConfig, DataName, OnBadImage
from qtl.data.cache import cached_splits
from qtl.data.medmnist import read_npz
from qtl.data.medmnist_info import SYNTHETIC_KEY, medmnist_path
from qtl.data.medmnist_synthetic import write_synthetic
from qtl.data.nih import LABEL_FILE
from qtl.data.source import load_splits
from qtl.data.synthetic import IMAGE_DIR, MIMIC_CSV, MIMIC_DIR, generate
from qtl.labels import CXR8
from qtl.utils.errors import EXIT_INPUT, Handled, QtlError, QtlUserError

# Modules that need an optional extra (backend=torch / backend=tf) may be absent.
_OPTIONAL = ("torch", "tensorflow", "keras", "tensorcircuit")


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(qtl.__path__, "qtl.")]
    for pkg in ("qtl_launchers", "qtl_optuna"):
        sub = importlib.import_module(f"hydra_plugins.{pkg}")
        names += [f"hydra_plugins.{pkg}"]
        names += [m.name for m in pkgutil.walk_packages(sub.__path__, f"hydra_plugins.{pkg}.")]
    return names


def test_every_error_class_qtl_defines_is_mapped_or_handled():
    """An error class reaches the user as one line with its exit status (QtlError), or is
    caught inside qtl (Handled); a new class that is neither fails here."""
    assert hydra_plugins  # the launchers and the sweeper are qtl's too
    found: dict[str, type] = {}
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            assert any(x in str(err) for x in _OPTIONAL), f"{name}: {err}"
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    assert len(found) >= 15, sorted(found)  # the walk really found qtl's classes
    stray = [n for n, cls in found.items() if not issubclass(cls, QtlError | Handled)]
    assert stray == [], f"neither QtlError nor Handled: {stray}"
    both = [n for n, cls in found.items() if issubclass(cls, QtlError) and issubclass(cls, Handled)]
    assert both == []
    for name, cls in found.items():
        if issubclass(cls, QtlError):
            assert cls.exit_code in (1, 2, 3, 4), name
    # the MedMNIST format errors, through the one mapping
    from qtl.data.medmnist import MedMNISTFormatError

    err = MedMNISTFormatError("x.npz", "val_labels", "missing")
    assert one_line(err) == (
        EXIT_INPUT,
        "qtl: MedMNISTFormatError: x.npz: field 'val_labels': missing",
    )
    assert one_line(RuntimeError("a bug")) is None  # anything else keeps its traceback


# ---------------------------------------------------------------------------- config values

# (overrides, what the message must name); each group's fields of the wrong type and out of
# range. Composed and checked in process, as ``launch.py`` would (mode=describe builds the
# model too, training nothing).
CONFIG = [
    (["train.lr=abc"], "train.lr"),
    (["train.lr=-1"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=1.5"], "train.batch_size"),
    (["train.max_epochs=0"], "train.max_epochs"),
    (["train.patience=0"], "train.patience"),
    (["train.eval_batch_size=0"], "train.eval_batch_size"),
    (["train.optimizer=rmsprop"], "train.optimizer"),
    (["train.best_by=accuracy"], "train.best_by"),
    (["train.wait_for_lock=maybe"], "train.wait_for_lock"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.min_delta=-1"], "train.min_delta"),
    (["train.log_every=0"], "train.log_every"),
    (["train.devices=0"], "train.devices"),
    (["train.devices=many"], "train.devices"),
    (["data.max_rotation_deg=-5"], "data.max_rotation_deg"),
    (["data.workers=-1"], "data.workers"),
    (["head.depth=0"], "head.depth"),
    (["head.depth=x"], "head.depth"),
    (["head.simulator=qiskit"], "head.simulator"),
    (["head=nosuch"], "head/nosuch"),
    (["task.labels=[Foo]"], "task.labels"),
    (["task=cxr99"], "task/cxr99"),
    (["data.crop=8"], "data.crop"),
    (["data.resize=8"], "data.resize"),
    (["data.hflip_p=2"], "data.hflip_p"),
    (["data.on_bad_image=ignore"], "data.on_bad_image"),
    (["data.synth_sizes=7"], "data.synth_sizes"),
    (["seed=abc"], "seed"),
    (["progress=maybe"], "progress"),
    (["mode=nosuch"], "mode"),
    (["features.chunk=0"], "features.chunk"),
    (["features.level=99"], "features.level"),
    (["features.dtype=int8"], "features.dtype"),
    (["backbone.hidden_sizes=[8]"], "backbone.hidden_sizes"),
    (["backbone.freeze=perhaps"], "backbone.freeze"),
    (["logger=nosuch"], "logger/nosuch"),
    (["debug=tiny_medmnist", "model=vit", "model.dropout=1.5"], "model.dropout"),
    (["debug=tiny_medmnist", "model=vit", "model.pool=max"], "model.pool"),
    (["debug=tiny_medmnist", "model=vit", "model.num_heads=3"], "model.num_heads"),
    (["debug=tiny_medmnist", "model=qvit", "model.circuit.layers=0"], "model.circuit.layers"),
    (["debug=tiny_medmnist", "model=qvit", "model.circuit.encoding=foo"], "model.circuit.encoding"),
    (["debug=tiny_medmnist", "distill=joint", "distill.alpha=2"], "distill.alpha"),
    (["debug=tiny_medmnist", "distill=joint", "distill.temperature=0"], "distill.temperature"),
    (["debug=tiny_medmnist", "data.size=100"], "data.size"),
    (["head=dqc", "head.shots=0"], "head.shots"),
    (["head=dqc", "head.noise.depolarizing=1.5"], "head.noise.depolarizing"),
    (["head=dqc", "head.noise.readout=-0.1"], "head.noise.readout"),
    (["head=dqc", "head.noise.trajectories=0"], "head.noise.trajectories"),
    (["head=dqc", "head.noise.crosstalk=0.1"], "head.noise.crosstalk"),
    (["head=dqc", "head.gradient=finite_differences"], "head.gradient"),
    (["head=dqc", "head.noise.device_model=fake_nosuch"], "head.noise.device_model"),
    (["head=dqc", "head.noise.device_model=fake_armonk"], "head.noise.device_model"),
    (["debug=tiny_medmnist", "model=qvit", "model.circuit.shots=-5"], "model.circuit.shots"),
    (
        ["debug=tiny_medmnist", "model=qvit", "model.circuit.noise.phase_damping=2"],
        "model.circuit.noise.phase_damping",
    ),
    # a PennyLane device (docs/noise.md): unknown, cannot run the channels, too few wires,
    # a credential or a qtl-owned option in its options, shots <= 0
    (["head=dqc", "head.device.name=nosuch.qubit"], "head.device.name"),
    (
        ["head=dqc", "head.device.name=lightning.qubit", "head.noise.depolarizing=0.01"],
        "head.device.name",
    ),
    (["head=dqc", "head.device.name=default.mixed", "head.shots=0"], "head.shots"),
    (
        ["head=dqc", "head.device.name=default.mixed", "+head.device.options.token=abc"],
        "head.device.options.token",
    ),
    (
        ["head=dqc", "head.device.name=default.mixed", "+head.device.options.wires=2"],
        "head.device.options.wires",
    ),
    (
        ["debug=tiny_medmnist", "model=qvit", "model.hidden_size=24",
         "model.circuit.device.name=default.mixed"],
        "model.circuit.device",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("overrides", "field"), CONFIG, ids=[" ".join(c[0]) for c in CONFIG])
def test_bad_config_values_are_one_line_naming_the_field(overrides, field, tmp_path):
    base = [] if any(o.startswith("debug=") for o in overrides) else TINY
    try:
        cfg = compose("mode=describe", *base, *overrides)
        dispatch(cfg, tmp_path)
    except Exception as err:  # noqa: BLE001 - whatever it is, it must be a user error
        got = one_line(err)
        assert got is not None, f"not a user error: {type(err).__name__}: {err}"
        code, line = got
        assert code == EXIT_INPUT and "\n" not in line
        assert field in line, line
        return
    pytest.fail(f"{overrides} was accepted")


# ------------------------------------------------------------------------------- data files


@pytest.fixture(scope="module")
def cxr(tmp_path_factory) -> Path:
    """A small NIH-CXR-LT + MIMIC-CXR-LT set in the real formats."""
    root = tmp_path_factory.mktemp("bad-cxr") / "synth"
    sizes = {"train": 12, "val": 6, "test": 6, "external": 6}
    return generate(root, sizes=sizes, image_px=48, seed=0)


def _cxr_cfg(root: Path, cache: Path) -> DataConfig:
    return DataConfig(
        name=DataName.nih_cxr_lt,
        root=str(root),
        external_csv=str(root / MIMIC_DIR / MIMIC_CSV),
        external_root=str(root / MIMIC_DIR),
        resize=40,
        crop=32,
        workers=1,
        cache_dir=str(cache),
        on_bad_image=OnBadImage.fail,
    )


def _edit_csv(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def _set_cell(column: str, value: str):
    def fn(lines: list[str]) -> list[str]:
        header = lines[0].split(",")
        cells = lines[1].split(",")
        cells[header.index(column)] = value
        return [lines[0], ",".join(cells), *lines[2:]]

    return fn


_TRAIN = LABEL_FILE.format(split="train")
_MIMIC = f"{MIMIC_DIR}/{MIMIC_CSV}"


def _first_image(root: Path) -> Path:
    return sorted((root / IMAGE_DIR).iterdir())[0]


# (case, file it damages (relative to the root), how, what the message must name)
CXR_FILES = {
    "label csv missing": (_TRAIN, lambda p: p.unlink(), "not found"),
    "label csv empty": (_TRAIN, lambda p: p.write_text(""), "is empty"),
    "label csv truncated mid-row": (
        _TRAIN,
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "cells but the header has",
    ),
    "label csv not text": (_TRAIN, lambda p: p.write_bytes(b"\xff\xfe\x00\x81" * 64), "CSV"),
    "label column missing": (
        _TRAIN,
        lambda p: _edit_csv(p, lambda ls: [x.replace("Effusion", "Effusionn") for x in ls]),
        "lacks the column",
    ),
    "label of the wrong type": (
        _TRAIN,
        lambda p: _edit_csv(p, _set_cell("Effusion", "yes")),
        "column 'Effusion'",
    ),  # fmt: skip
    "label out of range": (
        _TRAIN,
        lambda p: _edit_csv(p, _set_cell("Effusion", "2")),
        "is not 0 or 1",
    ),  # fmt: skip
    "label csv header only": (_TRAIN, lambda p: _edit_csv(p, lambda ls: ls[:1]), "no rows"),
    "external csv missing": (_MIMIC, lambda p: p.unlink(), "not found"),
    # MIMIC's cells other than a positive read as negative (its uncertain -1 and blanks, by
    # the CheXpert labelling convention), so a missing column is what can be wrong there
    "external label column missing": (
        _MIMIC,
        lambda p: _edit_csv(p, lambda ls: [x.replace("Pleural Effusion", "Effusion?") for x in ls]),
        "lacks the column",
    ),
    "image truncated": (
        "first-image",
        lambda p: p.write_bytes(p.read_bytes()[:40]),
        "bad image",
    ),
    "image not an image": ("first-image", lambda p: p.write_text("no pixels"), "bad image"),
    "image missing": ("first-image", lambda p: p.unlink(), "missing file"),
}


@pytest.mark.parametrize("case", list(CXR_FILES))
def test_bad_cxr_files_are_one_line_naming_the_file(case, cxr, tmp_path):
    rel, damage, expect = CXR_FILES[case]
    root = tmp_path / "data"
    shutil.copytree(cxr, root)
    target = _first_image(root) if rel == "first-image" else root / rel
    damage(target)
    cfg = _cxr_cfg(root, tmp_path / "cache")
    with pytest.raises(QtlUserError) as err:
        cached_splits(cfg, load_splits(cfg, CXR8, check_files=False))
    code, line = one_line(err.value)
    assert code == EXIT_INPUT
    assert target.name in line and expect in line, line
    if rel != "first-image":  # an image error lists the bad ones, one per line after it
        assert "\n" not in line, line


def _npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def medmnist(tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays of a small real-format MedMNIST file (retinamnist: 5 ordinal classes)."""
    root = tmp_path_factory.mktemp("bad-medmnist")
    path = write_synthetic(root, "retinamnist", 28, sizes={"train": 8, "val": 4, "test": 4})
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files if k != SYNTHETIC_KEY}  # as a real file


def _without(arrays: dict, key: str) -> dict:
    return {k: v for k, v in arrays.items() if k != key}


MEDMNIST = {
    "field missing": (lambda a: _without(a, "val_labels"), "field 'val_labels': missing"),
    "label out of range": (
        lambda a: {**a, "train_labels": a["train_labels"] + 7},
        "field 'train_labels': label value",
    ),
    "label negative": (lambda a: {**a, "test_labels": a["test_labels"] - 9}, "out of range"),
    "labels float": (
        lambda a: {**a, "train_labels": a["train_labels"].astype(np.float32)},
        "expected an integer type",
    ),
    "images float": (
        lambda a: {**a, "val_images": a["val_images"].astype(np.float32)},
        "field 'val_images': dtype float32, expected uint8",
    ),
    "images wrong size": (
        lambda a: {**a, "test_images": a["test_images"][:, :14, :14]},
        "expected 28x28",
    ),
    "rows mismatch": (
        lambda a: {**a, "train_labels": a["train_labels"][:-1]},
        "rows but train_images has",
    ),
    "labels wrong shape": (
        lambda a: {**a, "val_labels": a["val_labels"].reshape(-1)},
        "field 'val_labels': shape",
    ),
}


@pytest.mark.parametrize("case", list(MEDMNIST))
def test_bad_medmnist_files_are_one_line_naming_the_field(case, medmnist, tmp_path):
    change, expect = MEDMNIST[case]
    path = tmp_path / "retinamnist.npz"
    _npz(path, **change(dict(medmnist)))
    with pytest.raises(QtlUserError) as err:
        read_npz(path, "retinamnist", 28, check_split_sizes=False)
    code, line = one_line(err.value)
    assert code == EXIT_INPUT and "\n" not in line
    assert str(path) in line and expect in line, line


def test_medmnist_files_cut_short_or_damaged_inside(medmnist, tmp_path):
    path = tmp_path / "retinamnist.npz"
    _npz(path, **medmnist)
    whole = path.read_bytes()
    cases = {
        "truncated": whole[: len(whole) // 2],
        "empty": b"",
        "not a zip": b"PK but not really" * 10,
    }
    for blob in cases.values():
        path.write_bytes(blob)
        with pytest.raises(QtlUserError, match="not a readable .npz archive"):
            read_npz(path, "retinamnist", 28, check_split_sizes=False)
    # a member whose bytes are damaged inside a zip whose directory is intact
    with zipfile.ZipFile(io.BytesIO(whole)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["train_images.npy"] = members["train_images.npy"][:100]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(QtlUserError, match="field 'train_images': unreadable"):
        read_npz(path, "retinamnist", 28, check_split_sizes=False)
    missing = tmp_path / "nowhere"
    from qtl.data.medmnist import load_medmnist

    with pytest.raises(QtlUserError, match="no such MedMNIST file"):
        load_medmnist(missing, "retinamnist", 28)


def test_bad_teacher_folders_are_one_line(tmp_path):
    """distill.teacher= a folder that is not a finished qtl run, or whose checkpoint is gone."""
    from qtl.studies import study_for
    from qtl.studies.teacher import resolve_teacher

    for name, make in {
        "empty folder": lambda d: d.mkdir(),
        "not a folder": lambda d: d.write_text("x"),
    }.items():
        folder = tmp_path / name.replace(" ", "-")
        make(folder)
        cfg = compose("debug=tiny_medmnist", "model=vit", "distill=joint",
                      f"distill.teacher={folder}")  # fmt: skip
        with pytest.raises(QtlUserError) as err:
            resolve_teacher(cfg, study_for(cfg))
        code, line = one_line(err.value)
        assert code == EXIT_INPUT and "\n" not in line and str(folder) in line, (name, line)


def test_damaged_feature_store_files_are_recomputed_not_fatal(tmp_path):
    """Feature chunks and manifests are a cache: damage is named in a warning and recomputed."""
    from qtl.data.features import features_for

    images = np.random.default_rng(0).integers(0, 256, size=(40, 4, 4), dtype=np.uint8)
    embed = lambda x: x.reshape(len(x), -1)[:, :3].astype(np.float32)  # noqa: E731
    kw = dict(images_for=lambda: (images, {}), embed=embed, width=3, chunk=16, batch_size=8,
              level=1)  # fmt: skip
    store = tmp_path / "f"
    parts = {"k": 1, "dtype": "float32"}
    want = features_for(store, parts, **kw).features
    manifest = store / "manifest.json"
    good = manifest.read_text()
    for damage in (good[: len(good) // 2], '{"parts": 3}', "[]"):  # cut short, foreign
        manifest.write_text(damage)
        np.testing.assert_array_equal(features_for(store, parts, **kw).features, want)
    manifest.write_text(good.replace('"rows"', '"rowz"'))  # the right key, a field missing
    with pytest.warns(UserWarning, match="manifest.json is damaged .*recomputing"):
        got = features_for(store, parts, **kw)
    np.testing.assert_array_equal(got.features, want)
    (store / "chunk-00001.qtlf").write_bytes(b"QTLF garbage")
    with pytest.warns(UserWarning, match="chunk-00001.qtlf is unusable"):
        got = features_for(store, parts, **kw)
    np.testing.assert_array_equal(got.features, want)


# ---------------------------------------------------------------- as a user meets them


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


@pytest.mark.slow
def test_launch_gives_one_line_exit_2_and_removes_nothing(medmnist, tmp_path):
    # a config value of the wrong type: before any job runs
    bad_type = launch(*TINY, "train.lr=fast", cwd=tmp_path)
    assert bad_type.returncode == 2, bad_type.stderr[-2000:]
    lines = [x for x in bad_type.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0] and "Traceback" not in bad_type.stderr

    # a MedMNIST file with labels out of range, in a folder that holds other work too
    data = tmp_path / "medmnist"
    data.mkdir()
    _npz(medmnist_path(data, "retinamnist"),
         **{**medmnist, "val_labels": medmnist["val_labels"] + 5})  # fmt: skip
    (data / "notes.txt").write_text("keep me")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "keep").write_text("an earlier attempt's file")
    before = _snapshot(data) | {f"run/{k}": v for k, v in _snapshot(run_dir).items()}
    got = launch("debug=tiny_medmnist", "model=vit", f"data.root={data}",
                 "data.check_split_sizes=false", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path)  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    lines = [x for x in got.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, got.stderr
    assert "MedMNISTFormatError" in lines[0] and "field 'val_labels'" in lines[0]
    assert "Traceback" not in got.stderr
    after = _snapshot(data) | {f"run/{k}": v for k, v in _snapshot(run_dir).items()}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing removed/changed


# ------------------------------------------------- real data that is missing; export folders


def test_missing_real_data_is_one_line_saying_where_it_looked_and_where_to_get_it(
    tmp_path, monkeypatch
):
    from qtl.data.medmnist import MedMNISTConfig, open_medmnist
    from qtl.data.mimic import read_mimic

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the medmnist package's ~/.medmnist
    cases = {
        "medmnist": (
            lambda: open_medmnist(
                MedMNISTConfig(root=str(tmp_path / "mm"), flag="retinamnist", synthetic=False)
            ),
            [str(tmp_path / "mm"), str(tmp_path / "home" / ".medmnist"), "retinamnist.npz",
             "pip install medmnist", "zenodo.org/records/10519652", "data.synthetic=true"],
        ),
        "nih": (
            lambda: load_splits(DataConfig(name=DataName.nih_cxr_lt, root=str(tmp_path)), CXR8),
            [LABEL_FILE.format(split="train"), "ChestX-ray14", "data=synthetic"],
        ),
        "mimic": (
            lambda: read_mimic(tmp_path / "mimic.csv", tmp_path, CXR8),
            [str(tmp_path / "mimic.csv"), "PhysioNet"],
        ),
    }  # fmt: skip
    for name, (call, parts) in cases.items():
        with pytest.raises(QtlUserError) as err:
            call()
        code, line = one_line(err.value)
        assert code == EXIT_INPUT and "\n" not in line, (name, line)
        assert all(p in line for p in parts), (name, line)


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    """An export of a tiny CXR model (untrained weights: the format is what is tested)."""
    from helpers import make_results

    from qtl.export.predictor import Predictor
    from qtl.export.write import write_folder
    from qtl.record.identity import config_dict
    from qtl.studies import study_for

    cfg = compose(*TINY, "head=cdl")
    study = study_for(cfg)
    p = study.predictable(cfg)
    results = make_results(config=config_dict(cfg), study="cxr", label="cxr8-cdl",
                           labels=list(cfg.task.labels), data_source="synthetic")  # fmt: skip
    predictor = Predictor(p.model, p.objective, p.outputs, p.descriptions, p.preprocessing, p.task)
    base = tmp_path_factory.mktemp("export")
    return write_folder(base / "model", results, predictor, base)


def _rewrite_weights(folder: Path, change) -> None:
    """Replace the weights by ``change(tensors)``, the manifest's checksum updated to match."""
    from safetensors.numpy import load_file, save_file

    from qtl.export.load import sha256

    path = folder / "model.safetensors"
    save_file(change(load_file(path)), str(path))
    manifest = json.loads((folder / "export.json").read_text())
    manifest["weights_sha256"] = sha256(path)
    (folder / "export.json").write_text(json.dumps(manifest))


def _edit_json(name: str, change):
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


EXPORTS = {
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    "weights corrupt": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00garbage"),
        "not a readable safetensors file",
    ),
    "weights changed": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\1"
        ),
        "sha256 differs",
    ),
    "tensor of the wrong shape": (
        lambda d: _rewrite_weights(d, lambda t: {**t, "head.fc.bias": np.zeros(3, np.float32)}),
        "tensor 'head.fc.bias' has shape (3,)",
    ),
    "tensor missing": (
        lambda d: _rewrite_weights(d, lambda t: _without(t, "head.fc.bias")),
        "tensor 'head.fc.bias' is missing",
    ),
    "config field missing": (
        _edit_json("config.json", lambda c: _without(c, "data")),
        "field 'data'",
    ),
    "config not JSON": (
        lambda d: (d / "config.json").write_text("{"),
        "config.json: not readable JSON",
    ),
    "labels disagree": (
        _edit_json("labels.json", lambda x: {**x, "outputs": x["outputs"][:-1]}),
        "field 'outputs' lists 7 columns",
    ),
    "newer format": (_edit_json("export.json", lambda m: {**m, "version": 99}), "version 99"),
    "no manifest": (lambda d: (d / "export.json").unlink(), "not an export folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXPORTS))
def test_bad_export_folders_are_one_line_naming_the_file(case, export_folder, tmp_path):
    from qtl.export.load import open_model

    folder = tmp_path / "model"
    shutil.copytree(export_folder, folder)
    change, expect = EXPORTS[case]
    change(folder)
    with pytest.raises(QtlUserError) as err:
        open_model(folder)
    code, line = one_line(err.value)
    assert code == EXIT_INPUT and "\n" not in line, line
    assert str(folder) in line and expect in line, line


@pytest.mark.slow
def test_launch_without_real_medmnist_is_one_line_exit_2(tmp_path):
    """data=medmnist (real files only): no file, no synthetic stand-in, one line."""
    import os

    kernels = os.environ.get("QTL_KERNEL_CACHE", str(Path.home() / ".cache/qtl/kernels"))
    env = {"HOME": str(tmp_path / "home"), "QTL_KERNEL_CACHE": kernels}  # kernels: built once
    got = launch("data=medmnist", "model=vit", f"data.root={tmp_path / 'none'}", cwd=tmp_path,
                 env=env)  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    lines = [x for x in got.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "MedMNISTMissing" in lines[0] and "zenodo" in lines[0], lines
    assert not (tmp_path / "none" / "retinamnist.npz").exists()  # nothing synthetic written
