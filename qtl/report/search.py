"""The report of a search folder (``experiment=search``): trials, best command, plots.

    python launch.py mode=report report.sweep=multirun/search/cxr19-dqc

A search folder is recognised by the ``search.json`` its sweeper writes (study name,
storage, objective). Trials are read from the Optuna storage; each trial's run record
(results.json in its run directory) adds epochs and both validation numbers. Writes
``<out>/report.md``, ``tables/trials.{csv,md}``, ``best_command.txt`` and
``figures/objective.png`` + ``figures/param_<name>.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qtl.record.files import RecordError, RunFiles
from qtl.report.tables import Table, _num

SEARCH_FILE = "search.json"  # written by hydra_plugins/qtl_optuna at the start of a search
STATE_COLORS = {"PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}


def is_search(folder: Path | str) -> bool:
    """Whether ``folder`` is a search's sweep folder (it holds ``search.json``)."""
    return (Path(folder) / SEARCH_FILE).is_file()


@dataclass
class SearchTrials:
    """A search as the report needs it."""

    folder: Path
    info: dict[str, Any]  # search.json
    storage: str
    rows: list[dict[str, Any]]  # one per trial, by number
    params: list[str]  # searched parameter names
    log_params: set[str] = field(default_factory=set)  # those on a log scale
    categorical: dict[str, list[Any]] = field(default_factory=dict)  # choices per category

    @property
    def direction(self) -> str:
        return str(self.info.get("direction", "minimize"))

    @property
    def objective(self) -> str:
        return str(self.info.get("objective", "objective"))

    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] == "COMPLETE"]

    def best(self) -> dict[str, Any] | None:
        done = self.complete()
        if not done:
            return None
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r["objective"])


def _storage(folder: Path, info: dict[str, Any]) -> str:
    """The study's storage URL; a SQLite file inside the folder is found even if it moved."""
    if info.get("storage_file"):
        db = folder / info["storage_file"]
        if db.exists():
            return f"sqlite:///{db.absolute()}"
    if not info.get("storage"):
        raise FileNotFoundError(
            f"{folder / SEARCH_FILE}: the search kept its study in memory (no storage), "
            "so there are no trials to report"
        )
    return str(info["storage"])


def _run_record(folder: Path, run_dir: str | None) -> dict[str, Any]:
    if not run_dir:
        return {}
    path = Path(run_dir) if os.path.isabs(run_dir) else folder / run_dir
    try:
        results = RunFiles(path, create=False).read_results()
    except RecordError:
        return {}
    return results.to_json() if results is not None else {}


def load_search(folder: Path | str) -> SearchTrials:
    """Read the study's trials and each trial's run record."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up logs at INFO on import
    import optuna
    from optuna.distributions import CategoricalDistribution

    folder = Path(folder)
    info = json.loads((folder / SEARCH_FILE).read_text())
    storage = _storage(folder, info)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=info["study_name"], storage=storage)
    rows, dists = [], {}
    for t in study.get_trials(deepcopy=False):
        dists.update(t.distributions)
        record = _run_record(folder, t.user_attrs.get("qtl_run_dir"))
        seconds = None
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "outcome": t.user_attrs.get("qtl_outcome", t.state.name.lower()),
                "objective": t.value if t.value is not None else math.nan,
                **{f"param:{k}": v for k, v in t.params.items()},
                "best_epoch": record.get("best_epoch"),
                "epochs": record.get("epochs"),
                "val_loss": record.get("best_val_loss"),
                "val_auroc": ((record.get("auroc") or {}).get("val") or {}).get("mean"),
                "seconds": seconds,
                "run_dir": t.user_attrs.get("qtl_run_dir"),
                "error": t.user_attrs.get("qtl_error"),
                "_params": dict(t.params),
            }
        )
    return SearchTrials(
        folder=folder,
        info=info,
        storage=storage,
        rows=sorted(rows, key=lambda r: r["trial"]),
        params=sorted(dists),
        log_params={k for k, d in dists.items() if getattr(d, "log", False)},
        categorical={
            k: list(d.choices) for k, d in dists.items() if isinstance(d, CategoricalDistribution)
        },
    )


def trials_table(search: SearchTrials) -> Table:
    params = [f"param:{p}" for p in search.params]
    cols = ["trial", "state", "outcome", "objective", *params, "best_epoch", "epochs",
            "val_loss", "val_auroc", "seconds", "run_dir", "error"]  # fmt: skip
    return Table(
        name="trials",
        title=f"Trials of {search.info['study_name']} ({search.direction} {search.objective})",
        columns=cols,
        rows=search.rows,
        formats={
            "objective": _num(".4f"),
            "val_loss": _num(".4f"),
            "val_auroc": _num(".3f"),
            "seconds": _num(".0f"),
        },  # fmt: skip
    )


def _without_search_preset(override: str) -> str | None:
    """``experiment=search`` dropped (it would start a search), other presets kept."""
    key, sep, value = override.partition("=")
    if key.lstrip("+~") != "experiment" or not sep:
        return override
    names = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    kept = [v for v in names if v != "search"]
    if not kept:
        return None
    return f"experiment={kept[0]}" if len(kept) == 1 else f"experiment=[{','.join(kept)}]"


def best_commands(search: SearchTrials) -> list[str]:
    """The best trial as one training run, and the same over five seeds."""
    best = search.best()
    if best is None:
        return []
    fixed = [o for o in (_without_search_preset(o) for o in search.info["fixed_overrides"]) if o]
    fixed = [o for o in fixed if not o.startswith(("name=", "seed="))]
    name = f"name={search.info['study_name']}-best"
    params = [f"{k}={v}" for k, v in sorted(best["_params"].items())]
    args = " ".join(shlex.quote(a) for a in [*fixed, name, *params])
    return [f"python launch.py {args}", f"python launch.py -m {args} seed=0,1,2,3,4"]


def _ax(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _mark_unfinished(ax, xs_by_state: dict[str, list[float]]) -> None:
    """Trials without an objective: crosses along the bottom edge, one colour per state."""
    for state, xs in xs_by_state.items():
        if xs:
            color = STATE_COLORS.get(state, "grey")
            ax.scatter(xs, [0.02] * len(xs), marker="x", color=color, label=state.lower(),
                       transform=ax.get_xaxis_transform(), clip_on=False)  # fmt: skip


def objective_plot(search: SearchTrials, path: Path, dpi: int) -> Path:
    """Objective per trial with the best-so-far line."""
    fig, ax = _ax(f"{search.info['study_name']}: {search.objective} per trial ({search.direction})",
                  "trial", search.objective)  # fmt: skip
    done = search.complete()
    if done:
        x = np.array([r["trial"] for r in done])
        y = np.array([r["objective"] for r in done])
        ax.scatter(x, y, color="#1f77b4", label="complete", zorder=3)
        accumulate = np.minimum if search.direction == "minimize" else np.maximum
        running = accumulate.accumulate(y)
        ax.step(x, running, where="post", color="black", lw=1, label="best so far")
        best = search.best()
        assert best is not None
        ax.scatter([best["trial"]], [best["objective"]], marker="*", s=200, color="gold",
                   edgecolor="black", zorder=4, label=f"best (trial {best['trial']})")  # fmt: skip
    others: dict[str, list[float]] = {}
    for r in search.rows:
        if r["state"] != "COMPLETE":
            others.setdefault(r["state"], []).append(r["trial"])
    _mark_unfinished(ax, others)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def param_plot(search: SearchTrials, name: str, path: Path, dpi: int) -> Path:
    """Objective against one parameter (log axis for log-scale parameters)."""
    fig, ax = _ax(f"{search.objective} against {name}", name, search.objective)
    key = f"param:{name}"
    rows = [r for r in search.rows if key in r]
    choices = search.categorical.get(name)
    rng = np.random.default_rng(0)
    at: dict[int, float] = {}  # x per trial; categories jittered once, so the star sits on its dot
    for r in rows:
        if choices is None:
            at[r["trial"]] = float(r[key])
        else:
            at[r["trial"]] = choices.index(r[key]) + float(rng.uniform(-0.12, 0.12))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if done:
        dots = ax.scatter([at[r["trial"]] for r in done], [r["objective"] for r in done],
                          c=[r["trial"] for r in done], cmap="viridis", zorder=3)  # fmt: skip
        fig.colorbar(dots, ax=ax, label="trial")
        best = search.best()
        if best is not None and key in best:
            ax.scatter([at[best["trial"]]], [best["objective"]], marker="*", s=200,
                       color="gold", edgecolor="black", zorder=4, label="best")  # fmt: skip
    others: dict[str, list[float]] = {}
    for r in rows:
        if r["state"] != "COMPLETE":
            others.setdefault(r["state"], []).append(at[r["trial"]])
    _mark_unfinished(ax, others)
    if done or others:
        ax.legend(fontsize=8)
    if choices is not None:
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
        ax.set_xlim(-0.5, len(choices) - 0.5)
    elif name in search.log_params:
        ax.set_xscale("log")
    return _save(fig, path, dpi)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def render(search: SearchTrials, out: Path, table: Table, commands: list[str],
           figures: list[Path]) -> str:  # fmt: skip
    counts: dict[str, int] = {}
    for r in search.rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [
        f"# Search {search.info['study_name']}",
        "",
        f"- Folder: `{search.folder}`; study storage: `{search.storage}`",
        f"- Objective: {search.objective} ({search.direction}), read from each run's results.json",
        f"- Trials in the study: {len(search.rows)} - "
        + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none")
        + f" (n_trials={search.info.get('n_trials', '?')} counts every ended trial except "
        "interrupted ones)",
        "",
        "## Best configuration",
        "",
    ]
    best = search.best()
    if best is None:
        lines.append("No trial completed yet.")
    else:
        lines += [
            f"Trial {best['trial']}: {search.objective} = {best['objective']:.4f} "
            f"(run: `{best['run_dir']}`)",
            "",
            *(f"- `{k}` = {v}" for k, v in sorted(best["_params"].items())),
            "",
            "As one training run, and over five seeds:",
            "",
            "```bash",
            *commands,
            "```",
        ]
    lines += ["", f"## Trials ([CSV]({_rel(out / 'tables' / 'trials.csv', out)}))", ""]
    shown = [c for c in table.columns if c not in ("run_dir", "error")]
    lines += [table.markdown(shown), ""]
    errors = [r for r in search.rows if r.get("error")]
    if errors:
        lines += ["Trials without an objective:", ""]
        lines += [f"- trial {r['trial']} ({r['outcome']}): {r['error']}" for r in errors]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{p.stem}]({_rel(p, out)})" for p in figures]
    return "\n".join(lines) + "\n"


def write_search_report(folder: Path | str, out: Path | str, dpi: int = 100) -> Path:
    """Write the search report for ``folder`` into ``out``; returns report.md's path."""
    out = Path(out)
    search = load_search(folder)
    table = trials_table(search)
    table.write(out / "tables")
    commands = best_commands(search)
    (out / "best_command.txt").write_text("\n".join(commands) + "\n" if commands else "")
    figures = [objective_plot(search, out / "figures" / "objective.png", dpi)]
    figures += [
        param_plot(search, name, out / "figures" / f"param_{name}.png", dpi)
        for name in search.params
    ]
    path = out / "report.md"
    path.write_text(render(search, out, table, commands, figures))
    best = search.best()
    print(
        f"[qtl] search report of {search.folder}: {len(search.rows)} trial(s), "
        f"{len(search.complete())} complete -> {path}"
    )
    if commands:
        print(f"[qtl] best trial {best['trial']}: {commands[0]}")  # type: ignore[index]
    return path
