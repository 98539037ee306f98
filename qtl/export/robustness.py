"""A finished run re-evaluated with its circuit's shots and noise replaced (``mode=robustness``,
docs/noise.md): the best checkpoint restored once as the driver does, the model rebuilt by the
run's study at each grid point with those weights, scored by the driver's eval step and the
study's own metric, so the exact point reproduces the recorded score."""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtl.config import ModelName, QtlConfig, RobustnessConfig


@dataclass(frozen=True)
class Point:
    """One grid point: shots (None = exact), one-/two-qubit depolarizing p, a device model."""

    shots: int | None
    depolarizing: float
    device_model: str | None = None

    @property
    def exact(self) -> bool:
        return self.shots is None and self.depolarizing == 0 and self.device_model is None


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


def with_point(
    cfg: QtlConfig, where: str, point: Point, trajectories: int, device: Any = None
) -> QtlConfig:
    """The run's config with its circuit's shots and noise replaced by ``point`` (and its
    simulator by ``device``, a DeviceConfig naming a PennyLane device)."""
    from qtl.config import NoiseConfig, validate_circuit_options

    out = copy.deepcopy(cfg)
    opts = out.head if where == "head" else out.model.circuit
    opts.shots = point.shots
    opts.noise = NoiseConfig(
        depolarizing=point.depolarizing,
        device_model=point.device_model,
        trajectories=trajectories if (point.depolarizing or point.device_model) else 1,
    )
    if device is not None and device.name is not None:
        opts.device = copy.deepcopy(device)
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

    def evaluate(
        self, point: Point | None, trajectories: int, batch_size: int, device: Any = None
    ) -> dict[str, Any]:
        """The study's metrics of the split at ``point`` (None: the run as trained), on
        ``device`` (a DeviceConfig; None or no name: the run's own simulator or device)."""
        from flax import nnx

        from qtl.evaluate.predict import predict

        cfg = self.cfg
        if point is not None and self.where is not None:
            if point.device_model:
                from qtl.quantum.noise.device_models import check_device_model

                check_device_model(point.device_model, "robustness.device_models", self.wires)
            cfg = with_point(cfg, self.where, point, trajectories, device)
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
                    metrics = flat or ev.evaluate(point, r.trajectories, batch, r.device)
                    rows.append(_row(run_dir, ev, point, metrics))
                except Exception as err:
                    rows.append(_row(run_dir, ev, point, {}, _reason(err)))
                pbar.update(1)
    if r.device.name is not None:  # where the circuit ran, in the table's circuit column
        for row in rows:
            if row["circuit"] not in ("", "none"):
                row["circuit"] = f"{row['circuit']} on {r.device.name}"
    return rows


def _reason(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]
