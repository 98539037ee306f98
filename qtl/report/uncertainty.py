"""How sure each score is: DeLong 95% intervals over test images, and ROC curves per label.

Read from each finished run's ``predictions_<split>.csv`` alone, so it is the same for every
study: a CSV with one label column per score column (CXR labels, multi-label and one-logit
binary sets) gives one interval per column; one class-index column and a probability per class
(multi-class, ordinal, two-logit binary) gives one-vs-rest intervals per class (the curves that
MedMNIST's macro AUC averages).

The seed-to-seed spread (mean +- sd, the paired tests) says how much a result moves with the
initialisation and batch order; these intervals say how much it would move on another test set
of the same size, which is what a single reported AUROC of a rare label needs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from qtl.evaluate.intervals import delong_interval, roc_points
from qtl.report.tables import Table

if TYPE_CHECKING:
    from qtl.report.collect import Run, Sweep

TEST_SPLITS = ("test", "external")


def read_scores(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(column names, 0/1 truth (N, C), scores (N, C)) from a run's predictions CSV."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty predictions file")
    header, body = rows[0], rows[1:]
    probs = [i for i, c in enumerate(header) if c.startswith("prob_")]
    labels = [i for i, c in enumerate(header) if i and not c.startswith("prob_")]
    names = [header[i][len("prob_") :] for i in probs]
    scores = np.array([[float(r[i]) for i in probs] for r in body], dtype=float)
    truth = np.array([[float(r[i]) for i in labels] for r in body], dtype=float)
    if len(labels) == len(probs):
        return names, truth, scores
    if len(labels) == 1:  # a class index: one-vs-rest per class
        classes = truth[:, 0].astype(int)
        return names, (classes[:, None] == np.arange(len(probs))[None, :]).astype(float), scores
    raise ValueError(f"{path}: {len(labels)} label columns for {len(probs)} score columns")


def _best_val_loss(run: Run) -> float:
    best = [r.val_loss for r in run.history if r.best and r.val_loss is not None]
    return min(best) if best else math.inf


def best_runs(sweep: Sweep) -> dict[tuple[str, str], Run]:
    """Per arm (the report's task and head), the finished run with the lowest best
    validation loss: the one a reader would deploy, chosen without looking at the test set."""
    out: dict[tuple[str, str], Run] = {}
    for run in sweep.finished:
        key = (run.task, run.head)
        if key not in out or _best_val_loss(run) < _best_val_loss(out[key]):
            out[key] = run
    return out


def interval_table(sweep: Sweep, level: float = 0.95) -> Table:
    """One row per finished run, test split and label/class: AUROC with its DeLong interval."""
    best = {id(r) for r in best_runs(sweep).values()}
    table = Table(
        name="auroc_intervals",
        title=f"AUROC per label with DeLong {level:.0%} intervals over test images",
        columns=[
            "task",
            "head",
            "seed",
            "best_run",
            "split",
            "label",
            "auroc",
            "low",
            "high",
            "positives",
            "negatives",
        ],
        formats={k: (lambda v: "–" if v is None else f"{v:.3f}") for k in ("auroc", "low", "high")},
    )
    for run in sweep.finished:
        for split in TEST_SPLITS:
            path = run.dir / f"predictions_{split}.csv"
            if not path.exists():
                continue
            names, truth, scores = read_scores(path)
            for j, name in enumerate(names):
                row: dict[str, Any] = {
                    "task": run.task,
                    "head": run.head,
                    "seed": run.seed,
                    "best_run": id(run) in best,
                    "split": split,
                    "label": name,
                }
                y = truth[:, j]
                row["positives"], row["negatives"] = int(y.sum()), int(len(y) - y.sum())
                if 0 < y.sum() < len(y):
                    ci = delong_interval(y, scores[:, j], level)
                    row.update(auroc=ci.auc, low=ci.low, high=ci.high)
                table.rows.append(row)
    return table


def roc_figures(sweep: Sweep, folder: Path, dpi: int) -> list[Path]:
    """``roc_<task>_<split>.png``: a panel per label, one curve per arm's best run."""
    best = best_runs(sweep)
    paths = []
    for task in sorted({t for t, _ in best}):
        arms = {h: r for (t, h), r in best.items() if t == task}
        for split in TEST_SPLITS:
            curves = {}
            for head, run in arms.items():
                path = run.dir / f"predictions_{split}.csv"
                if path.exists():
                    curves[head] = read_scores(path)
            if not curves:
                continue
            names = next(iter(curves.values()))[0]
            cols = min(5, len(names))
            rows = -(-len(names) // cols)
            fig = Figure(figsize=(3.0 * cols, 3.0 * rows))
            for j, name in enumerate(names):
                ax = fig.add_subplot(rows, cols, j + 1)
                ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
                for head, (_, truth, scores) in curves.items():
                    y = truth[:, j]
                    if 0 < y.sum() < len(y):
                        fpr, tpr = roc_points(y, scores[:, j])
                        ci = delong_interval(y, scores[:, j])
                        ax.plot(
                            fpr,
                            tpr,
                            lw=1.2,
                            label=f"{head} {ci.auc:.2f} [{ci.low:.2f}, {ci.high:.2f}]",
                        )
                ax.set_title(f"{name} (n+={int(truth[:, j].sum())})", fontsize=9)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.tick_params(labelsize=7)
                ax.legend(fontsize=6, loc="lower right")
            fig.suptitle(f"{task}, {split}: ROC of each arm's best run (AUROC [95% CI])")
            fig.supxlabel("false-positive rate")
            fig.supylabel("true-positive rate")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"roc_{task}_{split}.png"
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
            paths.append(path)
    return paths
