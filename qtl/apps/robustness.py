"""``mode=robustness``: how much of a trained model's score survives shots and noise.

Every finished run under ``robustness.runs`` (a run folder, or a sweep searched for
results.json) is re-evaluated on ``robustness.split`` with its circuit's shots and noise replaced
by each grid point: ``shots`` x (each ``depolarizing`` strength, then each device model at
depolarizing 0). The weights are the run's best checkpoint; the evaluation is the driver's (the
study's eval step and ``qtl.evaluate.predict``, the study's own metric: mean AUROC for the CXR
study, AUC and ACC for MedMNIST), so the exact point reproduces the run's recorded score. The
circuit is the DQC head (``head.*``) or the QViT's quantum layers (``model.circuit.*``); a run
without one (CDL, ViT) is evaluated once and drawn as a flat line. Shots and trajectories draw
keys from the run's seed (reproducible). Writes robustness.csv, robustness.md and
robustness.png; a run that cannot be evaluated is listed there with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import ConfigError, QtlConfig, RobustnessConfig


def check_grid(r: RobustnessConfig) -> None:
    """One-line ConfigError naming the field for a grid value that cannot work."""
    if not r.shots:
        raise ConfigError("robustness.shots is empty: list shot counts, null for exact")
    for i, s in enumerate(r.shots):
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s <= 0):
            raise ConfigError(
                f"robustness.shots[{i}]={s}: expected a positive integer or null (exact)."
            )
    if not r.depolarizing and not r.device_models:
        raise ConfigError("robustness.depolarizing is empty: list probabilities (0 = none)")
    for i, p in enumerate(r.depolarizing):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(
                f"robustness.depolarizing[{i}]={p}: expected a probability in [0, 1]."
            )
    if r.trajectories < 1:
        raise ConfigError(f"robustness.trajectories={r.trajectories}: expected >= 1.")
    if r.device_models:
        from qtl.quantum.noise.device_models import check_device_model

        for i, name in enumerate(r.device_models):  # the qubit count is checked per run
            check_device_model(name, f"robustness.device_models[{i}]")
    if r.device.name is not None:  # a PennyLane device for every point (docs/noise.md)
        from qtl.quantum.device import check_name, check_options, options_of

        check_name(r.device.name, "robustness.device.name")
        check_options(options_of(r.device), "robustness.device.options")


def main(cfg: QtlConfig, run_dir: Path | None = None) -> dict[str, Any]:
    import tempfile

    from qtl.export.robustness import evaluate_runs, find_runs
    from qtl.progress import want_progress
    from qtl.report.robustness import (
        CSV,
        FIGURE,
        MARKDOWN,
        metric_names,
        write_csv,
        write_figure,
        write_markdown,
    )

    r = cfg.robustness
    if r is None or not r.runs:
        raise ConfigError(
            "robustness.runs is not set: mode=robustness needs a finished run or a sweep folder, "
            "e.g. python launch.py mode=robustness robustness.runs=multirun/<date>/<time>"
        )
    check_grid(r)  # before any work
    folder = Path(r.runs).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"robustness.runs={r.runs}: no such folder")
    if not find_runs(folder):
        raise ConfigError(f"robustness.runs={r.runs}: no finished run (results.json) there")
    if r.out:
        out = Path(r.out).expanduser()
    elif run_dir is not None:
        out = Path(run_dir)
    else:
        raise ConfigError("robustness.out is not set: name the folder to write")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:  # what a study's inputs may write
        rows = evaluate_runs(r, cfg, Path(scratch), want_progress(cfg.progress))
    write_csv(out / CSV, rows)
    write_markdown(out / MARKDOWN, rows)
    names = metric_names(rows)
    metric = "auroc" if "auroc" in names else ("auc" if "auc" in names else None)
    if metric is not None:
        write_figure(out / FIGURE, rows, metric)
    failed = sorted({row["run"] for row in rows if row["error"]})
    print(f"[qtl] robustness: {len(rows) - len(failed)} row(s) -> {out / CSV}, {out / MARKDOWN}"
          + (f", {out / FIGURE}" if metric else ""))  # fmt: skip
    for run in failed:
        print(f"[qtl] not evaluated: {run} (reason in {out / MARKDOWN})")
    return {"out": str(out), "rows": len(rows), "failed": failed}
