"""report.md: one page that states the comparison and links every table and figure."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

from qtl.report.collect import TEST_SETS, Sweep
from qtl.report.stats import Key, Paired
from qtl.report.tables import Table, device

# Columns report.md shows (the CSV files keep all of them).
_LABEL_COLS = ["label", "n_pairs", "cdl", "dqc", "diff", "pct_diff", "p", "stars", "p_holm", "q_bh"]
_INTERVAL_COLS = ["task", "head", "seed", "split", "label", "auroc", "low", "high", "positives"]
_CONVERGENCE_COLS = ["task", "head", "n_seeds", "best_epoch", "epochs", "final_val_loss",
                     "best_val_loss", "train_seconds"]  # fmt: skip
_RUN_COLS = ["task", "head", "seed", "status", "best_epoch", "epochs", "test_mean_auroc",
             "external_mean_auroc", "data", "train_seconds", "total_seconds", "device"]  # fmt: skip


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _pairs_note(sweep: Sweep, comps: dict[Key, Paired]) -> list[str]:
    """Which seeds the statistics use per task, and which were left out and why."""
    lines = []
    for task in sweep.tasks:
        used = next((c.seeds for (t, _, label), c in comps.items() if t == task and not label), ())
        left = [s for s in sweep.seeds(task) if s not in used]
        text = f"- {task.upper()}: seeds {', '.join(map(str, used)) or 'none'}"
        if left:
            text += f" (left out: {', '.join(map(str, left))} - not finished by both heads)"
        lines.append(text)
    return lines


def _problems(sweep: Sweep) -> list[str]:
    lines = [
        f"- **{r.status}** `{r.dir.relative_to(sweep.root).as_posix()}` "
        f"({r.task} {r.head} seed {r.seed}): {r.problem}"
        for r in sweep.failed
    ]
    lines += [
        f"- **missing** {task} {head} seed {seed}: no run directory" for task, head, seed in
        sweep.missing
    ]  # fmt: skip
    return lines or ["- none: every run of the grid finished."]


def _hardware(sweep: Sweep) -> list[str]:
    devices: dict[str, int] = {}
    for r in sweep.finished:
        hw = r.results.hardware if r.results else {}
        key = f"{device(hw) or '?'} on host {hw.get('host', '?')} ({hw.get('cpus', '?')} CPUs)"
        devices[key] = devices.get(key, 0) + 1
    return [f"- {key}: {n} run(s)" for key, n in devices.items()]


def render(
    sweep: Sweep,
    out: Path,
    tables: dict[str, Table],
    table_files: dict[str, tuple[Path, Path]],
    figures: dict[str, list[Path]],
    comps: dict[Key, Paired],
    alpha: float,
) -> str:
    """The text of report.md (written by the caller into ``out``)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    n_fin, n_fail, n_miss = len(sweep.finished), len(sweep.failed), len(sweep.missing)
    lines = [
        f"# qtl report: `{sweep.root.name}`",
        "",
        f"Sweep folder `{sweep.root}`, report written {now}.",
        "",
        f"**{len(sweep.runs)} run(s) found: {n_fin} finished, {n_fail} failed or unfinished; "
        f"{n_miss} missing** (a task/head/seed the grid implies but with no run directory).",
        "",
        "Differences, % diff = 2(A_CDL − A_DQC)/(A_CDL + A_DQC) and the paired t-tests "
        "(two-sided, scipy `ttest_rel`, pairs matched by seed) use **only complete seed pairs** "
        "— seeds where both heads finished:",
        "",
        *_pairs_note(sweep, comps),
        "",
        f"Stars: `*` p < {alpha:g}, `**` p < 0.01, `***` p < 0.001, `ns` not significant; "
        "– = undefined (fewer than two pairs). The labels of one task and test set are tested "
        "together, so the per-label tables add Holm's adjusted p (`p_holm`: the chance of any "
        "false call among them) and Benjamini–Hochberg's (`q_bh`: the expected share of false "
        "calls); stars are the unadjusted p's.",
        "",
    ]
    if not comps:
        lines += ["_No CDL vs DQC comparison: the sweep needs finished runs of both heads._", ""]
    lines += ["## Mean AUROC", "", tables["headline"].markdown(), ""]
    lines += _figure_lines(figures.get("mean_auroc", []), out)
    lines += ["", "## Per-label AUROC", ""]
    per_label = tables["comparison"]
    for task in sweep.tasks:
        for split in sweep.test_sets(task):
            lines += [f"### {task.upper()}, {TEST_SETS[split]}", ""]
            lines += _figure_lines(
                [p for p in figures.get("per_label", []) if p.stem == f"per_label_{task}_{split}"],
                out,
            )
            rows = per_label.where(task=task, test_set=TEST_SETS[split])
            if rows.rows:
                lines += ["", rows.markdown(_LABEL_COLS), ""]
    if figures.get("volcano"):
        lines += [
            "## Volcano plots",
            "",
            "One point per label, task and test set: x = sign(d)·log2(1 + |d|) of the % "
            "difference d (right: CDL higher), y = −log10 p; the dashed line is "
            f"p = {alpha:g}. Labels above it are named.",
            "",
            *_figure_lines(figures["volcano"], out),
            "",
        ]
    if "auroc_intervals" in tables:
        lines += [
            "## How sure each AUROC is",
            "",
            "DeLong 95% intervals over the test images, per label, for each arm's best run "
            "(lowest validation loss); every run's are in the table file below. The interval "
            "is the spread another test set of the same size would give; the paired tests "
            "above are the spread over seeds.",
            "",
            tables["auroc_intervals"].where(best_run=True).markdown(_INTERVAL_COLS),
            "",
            *_figure_lines(figures.get("roc", []), out),
            "",
        ]
    lines += [
        "## Convergence",
        "",
        tables["convergence"].markdown(_CONVERGENCE_COLS),
        "",
        "(best epoch = the epoch with the lowest validation loss, whose weights are evaluated; "
        "mean over seeds.)",
        "",
        *_figure_lines(figures.get("loss_curves", []), out),
        "",
        "## Runs",
        "",
        "Failed, unfinished or missing:",
        "",
        *_problems(sweep),
        "",
        "Hardware:",
        "",
        *_hardware(sweep),
        "",
        tables["runs"].markdown(_RUN_COLS),
        "",
        "## Files",
        "",
    ]
    for name, (csv_path, md_path) in table_files.items():
        lines.append(
            f"- {tables[name].title}: [{csv_path.name}]({_rel(csv_path, out)}), "
            f"[{md_path.name}]({_rel(md_path, out)})"
        )
    return "\n".join(lines) + "\n"


def _figure_lines(paths: Sequence[Path], out: Path) -> list[str]:
    return [f"![{p.stem}]({_rel(p, out)})" for p in paths]
