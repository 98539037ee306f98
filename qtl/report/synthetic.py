"""Marks a report section made from synthetic data as such, where a reader looks first: the
heading of report.md and of every table file, and a line under the heading saying how many
runs trained on qtl's built-in synthetic data (scores that say nothing about real images)."""

from __future__ import annotations

from pathlib import Path

from qtl.report.collect import Sweep

MARK = "(synthetic data)"


def synthetic_runs(sweep: Sweep) -> tuple[int, int]:
    """(finished runs on synthetic data, finished runs)."""
    done = [r for r in sweep.finished if r.results is not None]
    return sum(r.results.synthetic for r in done), len(done)  # type: ignore[union-attr]


def mark_section(sweep: Sweep, out: Path, report: Path) -> None:
    """Add the mark to ``report`` and ``out/tables/*.md`` when any run used synthetic data."""
    synthetic, total = synthetic_runs(sweep)
    if not synthetic:
        return
    which = "every run" if synthetic == total else f"{synthetic} of {total} finished runs"
    banner = (
        f"> **Synthetic data**: {which} of this section trained and tested on qtl's built-in "
        "synthetic stand-in data (`data=synthetic`, or `data=medmnist data.synthetic=true`); "
        "their scores show that the pipeline works, not how a model does on real images."
    )
    _mark(report, banner)
    for table in sorted((out / "tables").glob("*.md")):
        _mark(table, None)


def _mark(path: Path, banner: str | None) -> None:
    lines = path.read_text().splitlines()
    at = next((i for i, x in enumerate(lines) if x.startswith("# ")), None)
    if at is None:  # a table file without a heading: one on top
        lines[:0] = [f"# {MARK}", ""]
        at = 0
    elif MARK not in lines[at]:
        lines[at] = f"{lines[at]} {MARK}"
    if banner is not None and banner not in lines:
        lines[at + 1 : at + 1] = ["", banner]
    path.write_text("\n".join(lines) + "\n")
