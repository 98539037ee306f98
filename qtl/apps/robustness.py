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

import copy
import csv
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import ConfigError, ModelName, QtlConfig, RobustnessConfig

CSV, MARKDOWN, FIGURE = "robustness.csv", "robustness.md", "robustness.png"


@dataclass(frozen=True)
class Point:
    """One grid point: shots (None = exact), one-/two-qubit depolarizing p, a device model."""

    shots: int | None
    depolarizing: float
    device_model: str | None = None

    @property
    def exact(self) -> bool:
        return self.shots is None and self.depolarizing == 0 and self.device_model is None


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


def grid(r: RobustnessConfig) -> list[Point]:
    """shots x (depolarizing strengths, then device models without extra depolarizing)."""
    noises = [(float(p), None) for p in r.depolarizing] + [(0.0, d) for d in r.device_models]
    return [Point(s, p, d) for s in r.shots for p, d in noises]


def find_runs(folder: Path) -> list[Path]:
    """The finished runs (results.json) at or under ``folder``, sorted."""
    if (folder / "results.json").is_file():
        return [folder]
    return sorted(p.parent for p in folder.rglob("results.json") if "checkpoints" not in p.parts)


def circuit_field(cfg: QtlConfig) -> str | None:
    """Which circuit options the run's model uses: ``head`` (DQC), ``model.circuit`` (QViT)."""
    if cfg.model.name == ModelName.qvit and cfg.model.quantum:
        return "model.circuit"
    if cfg.model.name == ModelName.resnet_dqc and str(cfg.head.name) == "dqc":
        return "head"
    return None


def with_point(cfg: QtlConfig, where: str, point: Point, trajectories: int) -> QtlConfig:
    """The run's config with its circuit's shots and noise replaced by ``point``."""
    from qtl.config import NoiseConfig, validate_circuit_options

    out = copy.deepcopy(cfg)
    opts = out.head if where == "head" else out.model.circuit
    opts.shots = point.shots
    opts.noise = NoiseConfig(
        depolarizing=point.depolarizing,
        device_model=point.device_model,
        trajectories=trajectories if (point.depolarizing or point.device_model) else 1,
    )
    validate_circuit_options(opts, where)
    return out


def _reseed(model: Any, seed: int) -> None:
    """Every random stream of ``model`` (a noisy circuit's shots and trajectories) keyed from
    the run's seed and the stream's place in the model: same seed, same draws."""
    import jax
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.RngKey))
    if not flat:
        return
    for path, var in flat:
        name = ".".join(str(k) for k in path)
        var.set_value(jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode())))
    nnx.update(model, nnx.from_flat_state(flat))


class RunEvaluator:
    """One finished run: its data split and best weights loaded once, then evaluated at any
    grid point through the driver's eval step."""

    def __init__(self, run_dir: Path, paths: Any, split: str, scratch: Path, show: bool):
        from flax import nnx

        from qtl.export.predictor import PredictError, finished_run, run_config
        from qtl.studies import get
        from qtl.train.checkpoint import Checkpoints

        results = finished_run(run_dir)
        cfg = run_config(results.config, str(run_dir / "results.json"))
        cfg.paths = paths  # where this machine keeps the data and caches
        self.results, self.cfg, self.study = results, cfg, get(results.study)
        self.start = self.study.start(cfg)
        inputs = self.study.inputs(cfg, scratch, show, **self.start)
        if split not in inputs.arrays:
            raise PredictError(f"{run_dir}: no split '{split}' (has {', '.join(inputs.arrays)})")
        self.images, self.labels = inputs.arrays[split][0], inputs.labels[split]
        self.names, self.objective = inputs.label_names, inputs.objective
        model = inputs.model
        target, steps, state = self._steps(model, cfg)
        best = run_dir / "checkpoints" / "best" / str(results.best_epoch)
        if not best.is_dir():
            raise PredictError(f"{run_dir}: best checkpoint {best} is missing")
        ckpts = Checkpoints(run_dir / "checkpoints")
        try:
            state, _ = ckpts.restore("best", state, step=results.best_epoch)
        finally:
            ckpts.close()
        nnx.update(target, state.params, state.rest)
        # the weights and statistics, without the random streams (a noisy run's key counters
        # belong to its own circuit; each grid point gets fresh streams from the seed)
        self.weights = nnx.state(model, nnx.Not(nnx.RngState))
        self.where = circuit_field(cfg)
        self.wires = len(self.names) if self.where == "head" else max(
            cfg.model.hidden_size, cfg.model.mlp_size
        )

    def _steps(self, model: Any, cfg: QtlConfig) -> tuple[Any, Any, Any]:
        """(the module holding the checkpoint's weights, the run's steps, a state template)."""
        if cfg.features.cache:  # the head alone trains (and is evaluated) on cached features
            from qtl.train.features import init_feature_state, make_feature_steps

            steps = make_feature_steps(model.head, cfg)
            return model.head, steps, init_feature_state(model.head, steps.tx)
        from qtl.train.step import init_state, make_steps

        steps = make_steps(model, cfg, self.objective)
        return model, steps, init_state(model, cfg, steps.tx)

    def evaluate(self, point: Point | None, trajectories: int, batch_size: int) -> dict[str, Any]:
        """The study's metrics of the split at ``point`` (None: the run as trained)."""
        from flax import nnx

        from qtl.evaluate.predict import predict

        cfg = self.cfg
        if point is not None and self.where is not None:
            if point.device_model:
                from qtl.quantum.noise.device_models import check_device_model

                check_device_model(point.device_model, "robustness.device_models", self.wires)
            cfg = with_point(cfg, self.where, point, trajectories)
        model = self.study.predictable(cfg).model
        nnx.update(model, self.weights)
        _reseed(model, cfg.seed)
        _, steps, state = self._steps(model, cfg)
        probs, _ = predict(steps.eval_step, state, self.images, self.labels, batch_size)
        mean, _, extra = steps.objective.score(self.labels, probs, self.names)
        if extra:
            return {k: v for k, v in extra.items() if k in ("auc", "acc")}
        return {"auroc": mean}


def _row(run_dir: Path, ev: RunEvaluator | None, point: Point, metrics: dict[str, Any],
         error: str = "") -> dict[str, Any]:  # fmt: skip
    r = ev.results if ev is not None else None
    return {
        "run": str(run_dir),
        "arm": ev.study.run_label(ev.cfg) if ev is not None else "",
        "seed": r.seed if r is not None else "",
        "circuit": (ev.where or "none") if ev is not None else "",
        "shots": "exact" if point.shots is None else point.shots,
        "depolarizing": point.depolarizing,
        "device_model": point.device_model or "",
        **metrics,
        "error": error,
    }


def evaluate_runs(r: RobustnessConfig, cfg: QtlConfig, scratch: Path, show: bool) -> list[dict]:
    """One row per run x grid point (a run without a circuit: the same value at every point);
    a run or a point that cannot be evaluated gets a row with its reason, the others go on."""
    from qtl.progress import bar

    runs = find_runs(Path(r.runs).expanduser())  # type: ignore[arg-type]
    points = grid(r)
    rows: list[dict[str, Any]] = []
    with bar(total=len(runs) * len(points), desc="robustness", enabled=show, unit="pt") as pbar:
        for run_dir in runs:
            try:
                ev = RunEvaluator(run_dir, cfg.paths, r.split, scratch, show=False)
                batch = ev.cfg.train.eval_batch_size
                flat = None if ev.where is not None else ev.evaluate(None, 1, batch)
            except Exception as err:  # listed in the table, the other runs go on
                rows.append(_row(run_dir, None, points[0], {}, _reason(err)))
                pbar.update(len(points))
                continue
            for point in points:
                try:
                    metrics = flat or ev.evaluate(point, r.trajectories, batch)
                    rows.append(_row(run_dir, ev, point, metrics))
                except Exception as err:
                    rows.append(_row(run_dir, ev, point, {}, _reason(err)))
                pbar.update(1)
    return rows


def _reason(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


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


def main(cfg: QtlConfig, run_dir: Path | None = None) -> dict[str, Any]:
    import tempfile

    from qtl.progress import want_progress

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
