"""``mode=robustness``'s table and figure from its rows (qtl.export.robustness): CSV, Markdown
(mean [min, max] over seeds per arm and grid point) and a PNG; :func:`append_robustness` adds
them to a sweep's report when they sit in its folder."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

CSV, MARKDOWN, FIGURE = "robustness.csv", "robustness.md", "robustness.png"


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    fixed = {"run", "arm", "seed", "circuit", "shots", "depolarizing", "device_model", "error"}
    return sorted({k for row in rows for k in row if k not in fixed})


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from qtl.utils.files import atomic_write_text

    keys = ["run", "arm", "seed", "circuit", "shots", "depolarizing", "device_model"]
    keys += [*metric_names(rows), "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in keys})
    atomic_write_text(path, buf.getvalue())


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.8g}"
    return "" if v is None else v


def summary(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, tuple[float, float, float, int]]]:
    """(arm, shots, depolarizing, device) -> metric -> (mean, min, max, seeds)."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for row in rows:
        if row["error"]:
            continue
        key = (row["arm"], row["shots"], row["depolarizing"], row["device_model"])
        for m in metric_names(rows):
            v = row.get(m)
            if isinstance(v, float | int) and math.isfinite(v):
                groups.setdefault(key, {}).setdefault(m, []).append(float(v))
    return {
        k: {m: (float(np.mean(v)), min(v), max(v), len(v)) for m, v in ms.items()}
        for k, ms in groups.items()
    }


def write_markdown(path: Path, rows: list[dict[str, Any]]) -> None:
    """The table over seeds (mean [min, max]) per arm and grid point, and the failed runs."""
    from qtl.utils.files import atomic_write_text

    names = metric_names(rows)
    lines = [
        "# Robustness: the test metric under shots and noise",
        "",
        "Mean over seeds [min, max]; shots `exact` = expectation values; device models at "
        "the snapshot's calibration. Every run x point: robustness.csv.",
        "",
        "| arm | shots | depolarizing | device model | seeds | "
        + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for (arm, shots, p, dev), ms in summary(rows).items():
        seeds = max(c[3] for c in ms.values())
        cells = [
            f"{ms[m][0]:.4f} [{ms[m][1]:.4f}, {ms[m][2]:.4f}]" if m in ms else "" for m in names
        ]
        lines.append(f"| {arm} | {shots} | {p:g} | {dev or '-'} | {seeds} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    failed = [row for row in rows if row["error"]]
    if failed:
        lines += ["", f"## Runs not evaluated ({len(failed)})", ""]
        lines += [f"- `{row['run']}`: {row['error']}" for row in failed]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_figure(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    """Left: the metric vs shots without gate noise; right: vs depolarizing p at exact
    shots, device models as marked points. One curve per arm, band = min-max over seeds."""
    from matplotlib.figure import Figure

    table = summary(rows)
    arms = sorted({k[0] for k in table})
    fig = Figure(figsize=(10, 4))
    ax_s, ax_p = fig.subplots(1, 2)
    finite = [k[1] for k in table if k[1] != "exact"]
    exact_x = (max(finite) * 10) if finite else 1
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        pts = sorted(
            ((exact_x if k[1] == "exact" else k[1]), v[metric])
            for k, v in table.items()
            if k[0] == arm and k[2] == 0 and not k[3] and metric in v
        )
        if pts:
            x, y = [p[0] for p in pts], np.array([p[1] for p in pts])
            ax_s.plot(x, y[:, 0], "o-", color=color, label=arm)
            ax_s.fill_between(x, y[:, 1], y[:, 2], color=color, alpha=0.2)
        pts = sorted(
            (k[2], v[metric])
            for k, v in table.items()
            if k[0] == arm and k[1] == "exact" and not k[3] and metric in v
        )
        if pts:
            x, y = [p[0] for p in pts], np.array([p[1] for p in pts])
            ax_p.plot(x, y[:, 0], "o-", color=color, label=arm)
            ax_p.fill_between(x, y[:, 1], y[:, 2], color=color, alpha=0.2)
        for k, v in table.items():
            if k[0] == arm and k[1] == "exact" and k[3] and metric in v:
                ax_p.errorbar([0], [v[metric][0]], yerr=[[v[metric][0] - v[metric][1]],
                              [v[metric][2] - v[metric][0]]], fmt="s", color=color)  # fmt: skip
                ax_p.annotate(k[3], (0, v[metric][0]), fontsize=7, color=color)
    if finite:
        ax_s.set_xscale("log")
        ticks = sorted({*finite, exact_x})
        ax_s.set_xticks(ticks, [("exact" if t == exact_x else f"{t:g}") for t in ticks])
        ax_s.minorticks_off()
    strengths = sorted({k[2] for k in table if k[2] > 0})
    if len(strengths) > 1:  # 0, 1e-3, 1e-2: log-spaced strengths, with 0 on the linear part
        ax_p.set_xscale("symlog", linthresh=strengths[0])
        ax_p.set_xticks([0, *strengths], ["0", *(f"{p:g}" for p in strengths)])
        ax_p.minorticks_off()
    ax_s.set_xlabel("shots (no gate noise)")
    ax_p.set_xlabel("depolarizing p per gate (exact shots; squares: device models)")
    for ax in (ax_s, ax_p):
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if arms:
        ax_s.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def append_robustness(out: Path, report: Path) -> None:
    """The table (and figure) of ``mode=robustness`` run with ``robustness.out`` = this
    report folder, as a section of report.md; nothing when there is none."""
    table = out / "robustness.md"
    if not table.is_file():
        return
    _, _, body = table.read_text().partition("\n")  # without its title
    lines = ["", "## Robustness under shots and noise", body.replace("\n## ", "\n### ")]
    figure = out / "robustness.png"
    if figure.is_file():
        lines.append(f"![robustness]({os.path.relpath(figure, report.parent)})")
    with report.open("a") as f:
        f.write("\n".join(lines) + "\n")
