"""The report's uncertainty: per-label DeLong intervals from the runs' predictions files, ROC
curves of each arm's best run, and Holm / BH adjusted p-values per family of labels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from test_report import SPLITS, TASKS, _report, _rows, _sweep

from qtl.evaluate.intervals import delong_interval
from qtl.record.files import RunFiles
from qtl.report.stats import adjust_pvalues
from qtl.report.uncertainty import read_scores


def _predict(run_dir: Path, task: str, seed: int, split: str, n: int = 120) -> None:
    rng = np.random.default_rng([seed, len(split), len(run_dir.parent.name)])
    labels = TASKS[task]
    y = (rng.uniform(size=(n, len(labels))) < 0.3).astype(int)
    y[0], y[1] = 1, 0  # every label has both classes
    probs = np.clip(0.3 + 0.3 * y + 0.25 * rng.standard_normal(y.shape), 0, 1)
    RunFiles(run_dir).write_predictions(split, [f"img{i}" for i in range(n)], y, probs, labels)


def _sweep_with_predictions(root: Path) -> Path:
    sweep = _sweep(root, seeds=(0, 1, 2))
    for run_dir in sorted(sweep.glob("*/seed*")):
        task = run_dir.parent.name.split("-")[0]
        for split in SPLITS:
            _predict(run_dir, task, int(run_dir.name[4:]), split)
    return sweep


def test_intervals_from_every_runs_predictions_and_roc_of_the_best(tmp_path):
    out = _report(_sweep_with_predictions(tmp_path / "sweep"))
    rows = _rows(out.parent / "tables" / "auroc_intervals.csv")
    assert len(rows) == 2 * 3 * len(SPLITS) * len(TASKS["cxr8"])  # heads x seeds x splits x labels
    for row in rows[:: len(TASKS["cxr8"]) - 1]:
        path = tmp_path / "sweep" / f"cxr8-{row['head']}" / f"seed{row['seed']}"
        names, truth, scores = read_scores(path / f"predictions_{row['split']}.csv")
        j = names.index(row["label"])
        ci = delong_interval(truth[:, j], scores[:, j])
        assert float(row["auroc"]) == pytest.approx(ci.auc, abs=1e-9)
        assert float(row["low"]) == pytest.approx(ci.low, abs=1e-9)
        assert float(row["high"]) == pytest.approx(ci.high, abs=1e-9)
        assert int(row["positives"]) == int(truth[:, j].sum())
    # the best run per arm: lowest best validation loss (seed 2: the longest hand-made history)
    best = {(r["head"], r["seed"]) for r in rows if r["best_run"] == "True"}
    assert best == {("cdl", "2"), ("dqc", "2")}
    text = out.read_text()
    for split in SPLITS:
        fig = out.parent / "figures" / f"roc_cxr8_{split}.png"
        assert fig.stat().st_size > 10_000
        assert f"(figures/{fig.name})" in text
    assert "## How sure each AUROC is" in text


def test_holm_and_bh_columns_adjust_each_task_and_test_set_over_its_labels(tmp_path):
    out = _report(_sweep(tmp_path / "sweep", seeds=(0, 1, 2, 3)))
    rows = _rows(out.parent / "tables" / "comparison.csv")
    for test_set in {r["test_set"] for r in rows}:
        family = [r for r in rows if r["test_set"] == test_set and r["label"] != "mean AUROC"]
        p = [float(r["p"]) for r in family]
        np.testing.assert_allclose([float(r["p_holm"]) for r in family], adjust_pvalues(p, "holm"))
        np.testing.assert_allclose([float(r["q_bh"]) for r in family], adjust_pvalues(p, "bh"))
        mean_row = next(r for r in rows if r["test_set"] == test_set and r["label"] == "mean AUROC")
        assert mean_row["p_holm"] == mean_row["q_bh"] == ""  # the mean is its own test


def test_class_index_predictions_give_one_vs_rest_columns(tmp_path):
    path = tmp_path / "predictions_test.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "prob_0", "prob_1", "prob_2"])
        w.writerows([["a", 0, 0.7, 0.2, 0.1], ["b", 2, 0.1, 0.2, 0.7], ["c", 1, 0.2, 0.5, 0.3]])
    names, truth, scores = read_scores(path)
    assert names == ["0", "1", "2"]
    np.testing.assert_array_equal(truth, np.eye(3)[[0, 2, 1]])
    assert scores.shape == (3, 3)
