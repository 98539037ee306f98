"""The study is a plug-in: each study refuses the other's fields, names its runs and W&B
groups, and a third study defined here alone (a tiny binary task on arrays) trains, crashes
and resumes, records, logs to W&B offline and is reported without a line of qtl changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import compose, launch

from qtl.config import ConfigError, QtlConfig, ReportConfig, validate
from qtl.record.schema import Results
from qtl.studies import register, study_for
from qtl.studies.base import Study
from qtl.train.driver import RunInputs
from qtl.train.objectives import Objective

TINY_QVIT = ("debug=tiny_medmnist", "model=qvit")


def _check(*overrides: str) -> QtlConfig:
    cfg = compose(*overrides)
    validate(cfg)
    study_for(cfg).validate(cfg)
    return cfg


# ------------------------------------------------------------------- each study its own fields


@pytest.mark.parametrize(
    ("overrides", "field", "study"),
    [
        ((*TINY_QVIT, "backbone.freeze=true"), "backbone.freeze=true", "medmnist"),
        ((*TINY_QVIT, "train.backbone_lr=0.01"), "train.backbone_lr=0.01", "medmnist"),
        ((*TINY_QVIT, "head.depth=5"), "head.depth=5", "medmnist"),
        (("debug=tiny", "model.hidden_size=16"), "model.hidden_size=16", "cxr"),
        (("debug=tiny", "distill.alpha=0.5"), "distill.alpha=0.5", "cxr"),
    ],
)
def test_the_other_studys_fields_are_refused_naming_field_and_study(overrides, field, study):
    with pytest.raises(ConfigError, match=rf"^{field} has no meaning in the {study} study"):
        _check(*overrides)


def test_own_fields_pass():
    _check(*TINY_QVIT, "distill=joint", "distill.alpha=0.5", "model.hidden_size=8")
    _check("debug=tiny", "backbone.freeze=true", "train.backbone_lr=0.01", "head.depth=2")


@pytest.mark.parametrize("data", [["data=medmnist"], []])
def test_cli_refuses_backbone_freeze_on_a_qvit_run_with_exit_2(tmp_path, data):
    proc = launch("backbone.freeze=true", "model=qvit", *data, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "backbone.freeze" in proc.stderr and "medmnist study" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


def test_study_is_chosen_from_data_or_named():
    assert study_for(compose("debug=tiny")).name == "cxr"
    assert study_for(compose(*TINY_QVIT)).name == "medmnist"
    assert study_for(compose("model=qvit")).name == "medmnist"  # its model decides
    assert study_for(compose("data=medmnist")).name == "medmnist"
    with pytest.raises(ConfigError, match="data=synthetic is the cxr study's data"):
        _check("model=qvit")
    assert study_for(compose("debug=tiny", "study=cxr")).name == "cxr"
    with pytest.raises(ConfigError, match="study='nope' is not a registered study"):
        study_for(compose("debug=tiny", "study=nope"))


def test_run_labels_and_wandb_groups_are_the_studys():
    cxr = compose("debug=tiny", "task=cxr14", "head=cdl", "seed=2")
    s = study_for(cxr)
    assert s.run_label(cxr) == "cxr14-cdl" and s.wandb_tags(cxr) == ["cxr14", "cdl", "seed2"]
    med = compose(*TINY_QVIT, "distill=joint", "data.flag=breastmnist", "seed=1")
    s = study_for(med)
    assert s.run_label(med) == "breastmnist-qvit-kd_joint"
    assert s.wandb_tags(med) == ["breastmnist", "qvit", "kd_joint", "seed1"]


def test_a_qvit_run_logs_to_its_datasets_wandb_group(tmp_path):
    pytest.importorskip("wandb")
    from qtl.apps.train import train_and_evaluate
    from qtl.record.wandb_file import read_run_file

    cfg = compose(*TINY_QVIT, "logger=wandb", "logger.wandb.mode=offline", "train.max_epochs=1")
    run_dir = tmp_path / "run"
    train_and_evaluate(cfg, run_dir)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = read_run_file(wandb_file)["run"]
    assert run["group"] == "retinamnist-qvit"
    assert "cxr8" not in run["tags"] and "retinamnist" in run["tags"]


# -------------------------------------------------------------- a third study, in this file only


class Linear(nnx.Module):
    """(B, 4, 4, 1) images -> one logit."""

    def __init__(self, seed: int):
        self.out = nnx.Linear(16, 1, rngs=nnx.Rngs(seed))

    def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.out(images.reshape(images.shape[0], -1))


class ToyObjective(Objective):
    """BCE on the one label; the split's score is its AUROC."""

    def normalize(self, images: jax.Array) -> jax.Array:
        return images / 255.0

    def score(self, labels, scores, names):
        from qtl.evaluate.metrics import mean_auroc, per_label_auroc

        per_label = per_label_auroc(labels, scores, ["y"])
        return mean_auroc(per_label), per_label, {}


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, 1)).astype(np.float32)
    x = rng.integers(0, 120, size=(n, 4, 4, 1)) + (y[:, :, None, None] * 100).astype(int)
    return x.astype(np.uint8), y


class ToyStudy(Study):
    name: ClassVar[str] = "toy"
    foreign: ClassVar[tuple[str, ...]] = ("backbone.freeze",)
    not_identity: ClassVar[tuple[str, ...]] = ("task.", "head.", "backbone.", "model.", "distill.")

    def run_label(self, cfg: Any) -> str:
        return "toy-linear"

    def inputs(self, cfg: QtlConfig, run_dir: Path, show: bool, **start: Any) -> RunInputs:
        arrays = {
            s: _arrays(n, i) for i, (s, n) in enumerate([("train", 64), ("val", 32), ("test", 32)])
        }
        model = Linear(cfg.seed)
        return RunInputs(
            model=model,
            table=[("linear", 17), ("total", 17)],
            arrays=arrays,
            labels={s: y for s, (_, y) in arrays.items()},
            ids={s: [f"{s}_{i}" for i in range(len(y))] for s, (_, y) in arrays.items()},
            label_names=["y"],
            score_names=None,
            objective=ToyObjective(),
            data_seconds=0.0,
            record={"task": "toy", "head": "linear", "train_label_counts": {"y": 1}},
        )

    def format_scores(self, results: Results) -> str:
        return f"toy test AUROC {results.mean_auroc('test'):.3f}"

    def describe(self, cfg: QtlConfig) -> list[tuple[str, int]]:
        print("toy: a linear layer on 16 pixels")
        return [("total", 17)]


TOY = ("study=toy", "data.augment=false", "train.max_epochs=3", "train.patience=3",
       "train.batch_size=16", "train.lr=0.05", "progress=false")  # fmt: skip


@pytest.fixture()
def toy():
    from qtl.studies import _STUDIES

    study = register(ToyStudy())
    yield study
    _STUDIES.pop(study.name)


def test_a_third_study_needs_one_module(toy, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    from qtl.apps.describe import main as describe
    from qtl.apps.train import train_and_evaluate
    from qtl.record.wandb_file import read_run_file
    from qtl.report.build import write_report
    from qtl.utils import faults

    with pytest.raises(ConfigError, match="backbone.freeze=true has no meaning in the toy"):
        _check(*TOY, "backbone.freeze=true")
    assert describe(compose(*TOY, "mode=describe")) == [("total", 17)]

    sweep = tmp_path / "sweep"
    wandb = ("logger=wandb", "logger.wandb.mode=offline")
    twin = train_and_evaluate(compose(*TOY), tmp_path / "twin")  # never interrupted

    # killed after its second epoch's commit, then the same command again: it resumes
    run_dir = sweep / "toy-linear" / "seed0"
    monkeypatch.setenv("QTL_FAULT", "after_last_save@2")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        train_and_evaluate(compose(*TOY, *wandb), run_dir)
    monkeypatch.delenv("QTL_FAULT")
    faults.reset()
    capsys.readouterr()
    results = train_and_evaluate(
        compose(*TOY, "logger=wandb", "logger.wandb.mode=offline"), run_dir
    )
    assert "resuming" in capsys.readouterr().out
    assert results["study"] == "toy" and results["epochs"] == twin["epochs"] == 3
    assert results["auroc"]["test"]["mean"] == pytest.approx(twin["auroc"]["test"]["mean"])
    assert results["auroc"]["test"]["mean"] > 0.8  # it learned the task
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    record = json.loads((run_dir / "run_config.json").read_text())
    assert not any(k.startswith(("task.", "head.", "backbone.")) for k in record["identity"])
    assert record["identity"]["study"] == "toy"

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files and {read_run_file(f)["run"]["group"] for f in files} == {"toy-linear"}

    path = write_report(ReportConfig(sweep=str(sweep)))
    text = path.read_text()
    assert "toy" in text and "linear" in text and f"{results['auroc']['test']['mean']:.3f}" in text
