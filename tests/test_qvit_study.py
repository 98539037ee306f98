"""The second study on the common framework: config wiring and its errors, describe counts,
a tiny end-to-end run per MedMNIST task type, and a distilled run resumed after a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import compose

from qtl.config import ConfigError, validate
from qtl.studies import run_subdir, study_for

TINY_MED = ["debug=tiny_medmnist"]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=qvit"], "trains on data=medmnist only"),
        (["data=medmnist"], "data=medmnist needs a MedMNIST model"),
        (["distill=joint"], "distill.mode=joint has no meaning in the cxr study"),
        (["experiment=qvit", "distill=pretrain", "distill.pretrain_epochs=40"], "leaves no label"),
        (["experiment=qvit", "data.size=32"], "data.size=32 is out of range"),
        (["experiment=qvit", "distill=joint", "distill.alpha=1.5"], "distill.alpha=1.5"),
        (["experiment=qvit", "data.augment=true"], "data.augment=true is not available"),
    ],
)
def test_invalid_study_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = compose(*overrides)
        validate(cfg)
        study_for(cfg).validate(cfg)


def test_cxr_grid_still_composes_and_medmnist_runs_get_their_own_folders():
    for task in ("cxr8", "cxr14", "cxr19"):
        for head in ("cdl", "dqc"):
            cfg = compose(f"task={task}", f"head={head}", "seed=3")
            validate(cfg)
            assert run_subdir(cfg) == f"{task}-{head}/seed3"
    dirs = {
        run_subdir(
            compose("experiment=qvit", f"model={m}", f"distill={d}", "data.flag=breastmnist")
        )
        for m in ("vit", "qvit")
        for d in ("none", "joint", "pretrain")
    }
    assert len(dirs) == 6 and "breastmnist-qvit-kd_joint/seed0" in dirs


def test_model_errors_name_the_field():
    from qtl.apps.describe import main

    with pytest.raises(ConfigError, match="hidden_size=6 does not divide"):
        main(
            compose("experiment=qvit", "model.hidden_size=6", "model.num_heads=4", "mode=describe")
        )
    with pytest.raises(ConfigError, match="patch_size=32 is larger"):
        main(compose("experiment=qvit", "model.patch_size=32", "mode=describe"))


# ----------------------------------------------------------------------------- describe


def test_describe_counts(capsys):
    from qtl.apps.describe import main
    from qtl.models.vit_config import vit_config
    from qtl.models.vit_costs import parameter_count

    cfg = compose("experiment=qvit", "model=qvit", "mode=describe")
    rows = dict(main(cfg))
    # the built module's count equals the analytic one (two independent counts)
    assert rows["total"] == parameter_count(vit_config(cfg.model), (28, 28, 3), 5) == 1421
    assert rows["attention projections (quantum)"] == 4 * 4 * 8  # 4 blocks x Q,K,V,O x (1, 8)
    out = capsys.readouterr().out
    assert "99.99% fewer parameters" in out  # against the ResNet-18 teacher
    vit_rows = dict(main(compose("experiment=qvit", "model=vit", "mode=describe")))
    assert abs(vit_rows["total"] - 1421) / 1421 < 0.02  # parameter-matched
    cnn = dict(main(compose("experiment=qvit", "model=resnet18", "mode=describe")))
    # torchvision's ResNet-18 (11,689,512) with a 3x3x3x64 stem for the 7x7 one and 5 outputs
    assert cnn["total"] == 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - 513_000 + 512 * 5 + 5


# ----------------------------------------------------------------------------- training


def _train(run_dir: Path, *overrides: str) -> dict:
    from qtl.apps.train import train_and_evaluate
    from qtl.utils import faults

    faults.reset()
    return train_and_evaluate(compose(*TINY_MED, *overrides), run_dir)


def _predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(path) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    n_prob = sum(h.startswith("prob_") for h in header)
    labels = np.array([[int(v) for v in r[1 : len(header) - n_prob]] for r in body])
    probs = np.array([[float(v) for v in r[len(header) - n_prob :]] for r in body])
    return header, labels, probs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "task", "model", "score_columns"),
    [
        ("retinamnist", "ordinal", "vit", 5),
        ("breastmnist", "binary", "vit", 1),
        ("chestmnist", "multi-label", "vit", 14),
        ("bloodmnist", "multi-class", "resnet18", 8),
    ],
)
def test_tiny_run_per_task_type(tmp_path, flag, task, model, score_columns):
    from qtl.evaluate.medmnist_metrics import evaluate

    res = _train(tmp_path / "run", f"data.flag={flag}", f"model={model}")
    assert res["study"] == "medmnist" and res["task_type"] == task and res["model"] == model
    assert res["epochs"] == 2 and 1 <= res["best_epoch"] <= 2
    for split in ("val", "test"):
        header, labels, probs = _predictions(tmp_path / "run" / f"predictions_{split}.csv")
        assert probs.shape[1] == score_columns and len(labels) == res["split_sizes"][split]
        again = evaluate(labels, probs, task)  # recomputed from what was written
        assert res["metrics"][split]["acc"] == pytest.approx(again["acc"], abs=1e-6)
        # the file keeps 6 decimals: near-uniform scores of a 2-epoch model tie there
        assert res["metrics"][split]["auc"] == pytest.approx(again["auc"], abs=5e-3)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["val_acc"] is not None for r in rows)


@pytest.mark.slow
def test_distilled_run_resumes_after_a_crash(tmp_path, capsys):
    from qtl.utils.faults import InjectedFault

    # the QViT end to end: circuits, dropout keys and the teacher's logits all checkpointed
    args = ("model=qvit", "distill=pretrain", "train.max_epochs=2")
    whole = _train(tmp_path / "whole", *args)
    assert whole["distill"] == "pretrain" and whole["teacher"]["checkpoint_sha256"]
    assert "training the teacher" in capsys.readouterr().out  # trained once, then cached
    mp = pytest.MonkeyPatch()
    mp.setenv("QTL_FAULT", "after_last_save@1")  # epoch 1 (KD) committed, epoch 2 to go
    mp.setenv("QTL_FAULT_ACTION", "raise")
    try:
        with pytest.raises(InjectedFault):
            _train(tmp_path / "crashed", *args)
    finally:
        mp.undo()
    resumed = _train(tmp_path / "crashed", *args)
    out = capsys.readouterr().out
    assert "resuming" in out and "after epoch 1" in out and "training the teacher" not in out
    assert resumed["teacher"] == whole["teacher"]  # the same cached logits
    for split in ("val", "test"):
        for metric in ("auc", "acc"):
            assert resumed["metrics"][split][metric] == pytest.approx(
                whole["metrics"][split][metric], abs=1e-5
            )
