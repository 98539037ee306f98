"""The report's figures as PNG files, drawn with matplotlib's Agg canvas (no display needed).

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot: nothing global is
switched, so drawing inside a Hydra callback or a notebook leaves their backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qtl.labels import CXR8, CXR14, CXR19
from qtl.record.schema import EpochRow
from qtl.report.collect import TEST_SETS, Sweep
from qtl.report.stats import Key, Paired, mean_sd, per_seed, signed_log2

COLORS = {"cdl": "#1f77b4", "dqc": "#ff7f0e"}
SPLIT_COLORS = {"test": "#2ca02c", "external": "#9467bd"}
TASK_MARKERS = {"cxr8": "o", "cxr14": "s", "cxr19": "^"}
# Volcano panels: the label groups the study compares separately.
LABEL_GROUPS = {
    "cxr8": ("CXR-8 labels", CXR8),
    "cxr14_additions": ("CXR-14 additions", tuple(x for x in CXR14 if x not in CXR8)),
    "cxr19_additions": ("CXR-19 additions", tuple(x for x in CXR19 if x not in CXR14)),
}


def _color(head: str) -> str:
    return COLORS.get(head, "#7f7f7f")


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _annotate_pair(ax, x0: float, x1: float, top: float, text: str, step: float) -> None:
    """A bracket over two bars with the significance text."""
    ax.plot([x0, x0, x1, x1], [top, top + step, top + step, top], color="black", lw=0.8)
    ax.text((x0 + x1) / 2, top + step, text, ha="center", va="bottom", fontsize=9)


def _p_text(c: Paired | None, alpha: float) -> str:
    if c is None or not math.isfinite(c.p):
        return "n/a (<2 pairs)" if c is None or c.n < 2 else "n/a"
    return f"{c.stars(alpha)} p={c.p:.2g}"


def _grouped_bars(
    ax, values: list[list[list[float]]], heads: list[str]
) -> tuple[np.ndarray, float]:
    """Bars from chance (0.5) per group and head, sd error bars; returns tops and the low end.

    ``values[g][h]`` are the per-seed values of group g, head h. A bar below chance points
    down, so a head worse than chance is visible rather than cut off.
    """
    width = 0.8 / len(heads)
    top = np.full(len(values), 0.5)
    low = 0.5
    for i, head in enumerate(heads):
        stats = [mean_sd(group[i]) for group in values]
        means = np.array([m for m, _ in stats])
        sds = np.nan_to_num(np.array([s for _, s in stats]))
        x = np.arange(len(values)) + (i - (len(heads) - 1) / 2) * width
        ax.bar(x, means - 0.5, width, bottom=0.5, yerr=sds, capsize=3, color=_color(head),
               label=head.upper())  # fmt: skip
        top = np.fmax(top, np.nan_to_num(means + sds, nan=0.5))
        low = min(low, float(np.nanmin(means - sds, initial=0.5)))
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.grid(axis="y", alpha=0.3)
    return top, low


def mean_auroc_bars(sweep: Sweep, comps: dict[Key, Paired], alpha: float, path: Path, dpi: int):
    """Mean AUROC (mean ± sd over seeds) per task and head, one panel per test set."""
    splits, tasks, heads = sweep.test_sets(), sweep.tasks, sweep.heads()
    fig = Figure(
        figsize=(max(3.5, 1.8 * len(tasks) + 1.5) * len(splits), 4.2), layout="constrained"
    )
    axes = fig.subplots(1, len(splits), squeeze=False, sharey=True)[0]
    width = 0.8 / len(heads)
    y_low, y_high = 0.5, 0.5
    for ax, split in zip(axes, splits, strict=True):
        values = [[list(per_seed(sweep, t, h, split, None).values()) for h in heads] for t in tasks]
        top, low = _grouped_bars(ax, values, heads)
        for j, task in enumerate(tasks):
            c = comps.get((task, split, None))
            if c is not None and len(heads) >= 2:
                _annotate_pair(ax, j - width / 2, j + width / 2, top[j] + 0.01,
                               _p_text(c, alpha), 0.01)  # fmt: skip
        ax.set_xticks(np.arange(len(tasks)), [t.upper() for t in tasks])
        y_low, y_high = min(y_low, low), max(y_high, float(np.max(top)))
        ax.set_xlabel("task")
        ax.set_title(TEST_SETS[split])
        ax.legend(loc="upper left", fontsize=9)
    axes[0].set_ylim(max(0.0, y_low - 0.03), min(1.05, y_high + 0.06))  # shared by the panels
    axes[0].set_ylabel("mean AUROC (bars start at chance, 0.5)")
    fig.suptitle("Mean AUROC, mean ± sd over seeds; paired t-test CDL vs DQC")
    return [_save(fig, path, dpi)]


def per_label_bars(
    sweep: Sweep, comps: dict[Key, Paired], alpha: float, folder: Path, dpi: int
) -> list[Path]:
    """Per-label AUROC per task and test set, labels sorted by training frequency."""
    out = []
    for task in sweep.tasks:
        labels, counts, heads = sweep.labels(task), sweep.train_counts(task), sweep.heads(task)
        for split in sweep.test_sets(task):
            fig = Figure(figsize=(max(6.0, 0.75 * len(labels) + 1.5), 4.8), layout="constrained")
            ax = fig.subplots()
            values = [
                [list(per_seed(sweep, task, h, split, x).values()) for h in heads] for x in labels
            ]
            top, low = _grouped_bars(ax, values, heads)
            for j, label in enumerate(labels):
                c = comps.get((task, split, label))
                if c is not None and c.stars(alpha) not in ("", "ns"):
                    ax.text(j, top[j] + 0.01, c.stars(alpha), ha="center", fontsize=10)
            names = [f"{x}\n(n={counts[x]})" if x in counts else x for x in labels]
            ax.set_xticks(np.arange(len(labels)), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(max(0.0, low - 0.03), min(1.05, float(top.max()) + 0.06))
            ax.set_xlabel("label (most frequent in training first; n = training positives)")
            ax.set_ylabel("AUROC (mean ± sd over seeds)")
            ax.set_title(f"{task.upper()}, {TEST_SETS[split]}: per-label AUROC "
                         f"(* p<{alpha:g}, paired t-test CDL vs DQC)")  # fmt: skip
            ax.legend(fontsize=9)
            out.append(_save(fig, folder / f"per_label_{task}_{split}.png", dpi))
    return out


def volcano(
    sweep: Sweep, comps: dict[Key, Paired], alpha: float, folder: Path, dpi: int
) -> list[Path]:
    """−log10 p against signed log2 % diff per label group, one point per task × test set."""
    out = []
    for stem, (title, group) in LABEL_GROUPS.items():
        points = [
            (task, split, label, c) for (task, split, label), c in comps.items() if label in group
        ]
        if not points:
            continue
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.subplots()
        shown = 0
        for task in sweep.tasks:
            for split in sweep.test_sets(task):
                pts = [(lab, c) for t, s, lab, c in points if (t, s) == (task, split)]
                pts = [(lab, c) for lab, c in pts if math.isfinite(c.p) and c.p > 0]
                if not pts:
                    continue
                xs = [signed_log2(c.pct_diff) for _, c in pts]
                ys = [-math.log10(c.p) for _, c in pts]
                ax.scatter(xs, ys, c=SPLIT_COLORS.get(split, "grey"),
                           marker=TASK_MARKERS.get(task, "D"), s=36, alpha=0.8,
                           label=f"{task.upper()}, {TEST_SETS[split]}")  # fmt: skip
                shown += len(pts)
                for (lab, c), x, y in zip(pts, xs, ys, strict=True):
                    if c.p < alpha:
                        ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")  # fmt: skip
        ax.axhline(-math.log10(alpha), color="red", ls="--", lw=1, label=f"p = {alpha:g}")
        ax.axvline(0, color="grey", lw=0.8)
        if shown == 0:
            ax.text(0.5, 0.5, "no p-values: needs ≥ 2 complete seed pairs",
                    transform=ax.transAxes, ha="center")  # fmt: skip
        ax.set_xlabel("sign · log2(1 + |% diff AUROC|)   (> 0: CDL higher)")
        ax.set_ylabel("−log10 p (paired t-test)")
        ax.set_title(f"Volcano plot, {title}: CDL vs DQC")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        out.append(_save(fig, folder / f"volcano_{stem}.png", dpi))
    return out


def _band(histories: list[list[EpochRow]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and sd of ``key`` over the runs still training at each epoch."""
    by_epoch: dict[int, list[float]] = {}
    for rows in histories:
        for row in rows:
            if getattr(row, key) is not None:
                by_epoch.setdefault(row.epoch, []).append(float(getattr(row, key)))
    epochs = np.array(sorted(by_epoch))
    stats = [mean_sd(by_epoch[e]) for e in epochs]
    mean = np.array([m for m, _ in stats])
    sd = np.nan_to_num(np.array([s for _, s in stats]))
    return epochs, mean, sd


def loss_curves(sweep: Sweep, folder: Path, dpi: int) -> list[Path]:
    """Train and validation loss per epoch per head (mean ± sd band over seeds), per task."""
    out = []
    for task in sweep.tasks:
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, title in zip(
            axes, ("train_loss", "val_loss"), ("training loss", "validation loss"), strict=True
        ):
            for head in sweep.heads(task):
                runs = [r for r in sweep.finished if (r.task, r.head) == (task, head)]
                epochs, mean, sd = _band([r.history for r in runs], key)
                if epochs.size == 0:
                    continue
                ax.plot(epochs, mean, color=_color(head), marker=".",
                        label=f"{head.upper()} ({len(runs)} seeds)")  # fmt: skip
                ax.fill_between(epochs, mean - sd, mean + sd, color=_color(head), alpha=0.2)
                best = [r.results.best_epoch for r in runs]  # type: ignore[union-attr]
                if key == "val_loss" and best:
                    ax.axvline(float(np.mean(best)), color=_color(head), ls=":", lw=1,
                               label=f"{head.upper()} mean best epoch")  # fmt: skip
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("binary cross-entropy")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{task.upper()}: loss per epoch, mean ± sd over seeds "
                     "(later epochs: seeds still training)")  # fmt: skip
        out.append(_save(fig, folder / f"loss_{task}.png", dpi))
    return out


Drawer = Callable[[Sweep, dict[Key, Paired], float, Path, int], list[Path]]


def draw(
    which: list[str], sweep: Sweep, comps: dict[Key, Paired], alpha: float, folder: Path, dpi: int
) -> dict[str, list[Path]]:
    """Draw the named figures (mean_auroc, per_label, volcano, loss_curves) into ``folder``."""
    drawers: dict[str, Drawer] = {
        "mean_auroc": lambda s, c, a, f, d: mean_auroc_bars(s, c, a, f / "mean_auroc.png", d),
        "per_label": per_label_bars,
        "volcano": volcano,
        "loss_curves": lambda s, c, a, f, d: loss_curves(s, f, d),
    }
    if not sweep.finished:  # every run failed: report.md still lists them, with no figures
        return {name: [] for name in which}
    return {name: drawers[name](sweep, comps, alpha, folder, dpi) for name in which}
