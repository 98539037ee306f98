"""The report's tables: built from a :class:`Sweep`, written as CSV (full precision) and
Markdown (rounded, for reading).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtl.report.collect import TEST_SETS, Sweep
from qtl.report.stats import Key, Paired, adjust_pvalues, mean_sd, per_seed


def _num(fmt: str) -> Callable[[Any], str]:
    def show(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "–"
        return format(value, fmt)

    return show


def _p(value: Any) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


AUROC, SD, PCT, LOSS, P = _num(".3f"), _num(".3f"), _num("+.2f"), _num(".4f"), _p


@dataclass
class Table:
    """Rows of plain values; ``formats`` says how Markdown shows a column (CSV keeps all)."""

    name: str  # file stem: tables/<name>.csv and .md
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = folder / f"{self.name}.csv", folder / f"{self.name}.md"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({c: _csv_value(row.get(c)) for c in self.columns})
        md_path.write_text(f"# {self.title}\n\n{self.markdown()}\n")
        return csv_path, md_path

    def where(self, **equal: Any) -> Table:
        """The rows whose columns have the given values (same columns and formats)."""
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in equal.items())]
        return Table(self.name, self.title, self.columns, rows, self.formats)

    def markdown(self, columns: Sequence[str] | None = None) -> str:
        cols = list(columns or self.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for row in self.rows:
            cells = [self.formats.get(c, _plain)(row.get(c)) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _plain(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    return str(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def _pm(mean: float, sd: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"


def device(hw: dict[str, Any]) -> str | None:
    """'cpu', 'gpu NVIDIA H100 ...': the platform, and the device kind when it says more."""
    platform, kind = hw.get("platform"), hw.get("device")
    if not (platform or kind):
        return None
    return str(platform or kind) if kind in (None, platform) else f"{platform} {kind}"


def _over_seeds(sweep: Sweep, task: str, head: str, split: str, label: str | None) -> dict:
    """n, mean, sd and which seeds, over the finished seeds of one task/head/test set/label."""
    values = per_seed(sweep, task, head, split, label)
    mean, sd = mean_sd(list(values.values()))
    return {"n_seeds": len(values), "mean": mean, "sd": sd, "seeds": " ".join(map(str, values))}


def mean_auroc_table(sweep: Sweep) -> Table:
    """Mean ± sd over finished seeds of each run's mean AUROC, per task × test set × head."""
    table = Table(
        "mean_auroc",
        "Mean AUROC per task, test set and head (mean ± sd over finished seeds)",
        ["task", "test_set", "head", "n_seeds", "mean", "sd", "seeds"],
        formats={"mean": AUROC, "sd": SD},
    )
    for task in sweep.tasks:
        for split in sweep.test_sets(task):
            for head in sweep.heads(task):
                row = {"task": task, "test_set": TEST_SETS[split], "head": head}
                table.rows.append(row | _over_seeds(sweep, task, head, split, None))
    return table


def per_label_table(sweep: Sweep) -> Table:
    """Per-label AUROC (mean ± sd over seeds), labels most frequent in training first."""
    table = Table(
        "per_label_auroc",
        "Per-label AUROC per task, test set and head (labels by training frequency)",
        ["task", "test_set", "label", "train_positives", "head", "n_seeds", "mean", "sd", "seeds"],
        formats={"mean": AUROC, "sd": SD},
    )
    for task in sweep.tasks:
        counts = sweep.train_counts(task)
        for split in sweep.test_sets(task):
            for label in sweep.labels(task):
                for head in sweep.heads(task):
                    row = {"task": task, "test_set": TEST_SETS[split], "label": label,
                           "train_positives": counts.get(label), "head": head}  # fmt: skip
                    table.rows.append(row | _over_seeds(sweep, task, head, split, label))
    return table


def comparison_table(
    comparisons: dict[Key, Paired], alpha: float, a: str = "cdl", b: str = "dqc"
) -> Table:
    """A vs B on complete seed pairs: means, difference, % difference, paired t-test, stars."""
    table = Table(
        "comparison",
        f"{a.upper()} vs {b.upper()}: paired t-test over matched seeds "
        f"(% diff = 2({a.upper()} − {b.upper()})/({a.upper()} + {b.upper()}); "
        f"* p<{alpha:g}, ** p<0.01, *** p<0.001)",
        ["task", "test_set", "label", "n_pairs", a, b, "diff", "pct_diff", "t", "p", "stars",
         "p_holm", "q_bh"],
        formats={a: AUROC, b: AUROC, "diff": _num("+.4f"), "pct_diff": PCT, "t": _num(".2f"),
                 "p": P, "p_holm": P, "q_bh": P},
    )  # fmt: skip
    # one family per task and test set: its labels, tested at once (the mean is its own test)
    families: dict[tuple[str, str], list[Key]] = {}
    for key in comparisons:
        if key[2] is not None:
            families.setdefault(key[:2], []).append(key)
    adjusted: dict[Key, tuple[float, float]] = {}
    for keys in families.values():
        ps = [comparisons[k].p for k in keys]
        for k, holm, bh in zip(
            keys, adjust_pvalues(ps, "holm"), adjust_pvalues(ps, "bh"), strict=True
        ):
            adjusted[k] = (holm, bh)
    for key, c in comparisons.items():
        task, split, label = key
        table.rows.append(
            {
                "task": task,
                "test_set": TEST_SETS[split],
                "label": label or "mean AUROC",
                "n_pairs": c.n,
                a: c.mean_a,
                b: c.mean_b,
                "diff": c.diff,
                "pct_diff": c.pct_diff,
                "t": c.t,
                "p": c.p,
                "stars": c.stars(alpha),
                "p_holm": adjusted.get(key, (None, None))[0],
                "q_bh": adjusted.get(key, (None, None))[1],
            }
        )
    return table


def headline_table(
    comparisons: dict[Key, Paired], alpha: float, a: str = "cdl", b: str = "dqc"
) -> Table:
    """The comparison on the mean AUROC only, with mean ± sd: the table report.md opens with."""
    table = Table(
        "headline",
        "Mean AUROC, CDL vs DQC",
        ["task", "test_set", a.upper(), b.upper(), "pct_diff", "p", "stars", "n_pairs"],
        formats={"pct_diff": PCT, "p": P},
    )
    for (task, split, label), c in comparisons.items():
        if label is None:
            table.rows.append(
                {
                    "task": task,
                    "test_set": TEST_SETS[split],
                    a.upper(): _pm(c.mean_a, c.sd_a),
                    b.upper(): _pm(c.mean_b, c.sd_b),
                    "pct_diff": c.pct_diff,
                    "p": c.p,
                    "stars": c.stars(alpha),
                    "n_pairs": c.n,
                }
            )
    return table


def convergence_table(sweep: Sweep) -> Table:
    """Best epoch, epochs run and validation losses per task × head (mean ± sd over seeds)."""
    table = Table(
        "convergence",
        "Convergence per head (mean ± sd over finished seeds)",
        ["task", "head", "n_seeds", "best_epoch", "best_epoch_sd", "epochs", "epochs_sd",
         "final_val_loss", "final_val_loss_sd", "best_val_loss", "best_val_loss_sd",
         "train_seconds"],
        formats={"best_epoch": _num(".1f"), "best_epoch_sd": _num(".1f"), "epochs": _num(".1f"),
                 "epochs_sd": _num(".1f"), "final_val_loss": LOSS, "final_val_loss_sd": LOSS,
                 "best_val_loss": LOSS, "best_val_loss_sd": LOSS, "train_seconds": _num(".0f")},
    )  # fmt: skip
    for task in sweep.tasks:
        for head in sweep.heads(task):
            runs = [r for r in sweep.finished if (r.task, r.head) == (task, head)]
            if not runs:
                continue
            row: dict[str, Any] = {"task": task, "head": head, "n_seeds": len(runs)}
            for key in ("best_epoch", "epochs", "final_val_loss", "best_val_loss"):
                values = [
                    getattr(r.results, key) for r in runs if getattr(r.results, key) is not None
                ]
                row[key], row[f"{key}_sd"] = mean_sd(values)
            row["train_seconds"] = mean_sd(
                [r.results.wall_seconds["train"] for r in runs]  # type: ignore[union-attr]
            )[0]
            table.rows.append(row)
    return table


def runs_table(sweep: Sweep) -> Table:
    """One row per job: status, epochs, test AUROC, wall time and the hardware it ran on."""
    table = Table(
        "runs",
        "Every run of the sweep",
        ["task", "head", "seed", "status", "best_epoch", "epochs", "test_mean_auroc",
         "external_mean_auroc", "data", "train_seconds", "total_seconds", "device", "host",
         "dir"],
        formats={"test_mean_auroc": AUROC, "external_mean_auroc": AUROC,
                 "train_seconds": _num(".0f"), "total_seconds": _num(".0f")},
    )  # fmt: skip
    for r in sweep.runs:
        res = r.results
        wall = res.wall_seconds if res else {}
        hw = res.hardware if res else {}
        table.rows.append(
            {
                "task": r.task,
                "head": r.head,
                "seed": r.seed,
                "status": r.status if r.finished else f"{r.status}: {r.problem}",
                "best_epoch": res.best_epoch if res else None,
                "epochs": res.epochs if res else None,
                "test_mean_auroc": r.auroc("test"),
                "external_mean_auroc": r.auroc("external"),
                "data": ("synthetic" if res.synthetic else "real") if res else None,
                "train_seconds": wall.get("train"),
                "total_seconds": sum(wall.get(k, 0.0) for k in ("data", "train", "evaluate"))
                if wall
                else None,
                "device": device(hw),
                "host": hw.get("host"),
                "dir": r.dir.relative_to(sweep.root).as_posix(),
            }
        )
    return table
