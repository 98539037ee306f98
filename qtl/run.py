"""What one job does, by ``mode``: train-and-evaluate a run, or describe the model.

``train_and_evaluate(cfg, run_dir)`` is the whole life of a run and is safe to call again
on the same directory: a finished run is reported, not retrained; an interrupted one resumes
from its last checkpoint; a directory that belongs to a different config is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from qtl.config import ConfigError, HeadName, Mode, QtlConfig, validate
from qtl.progress import want_progress

# Keys that do not change what a run computes; a rerun may differ in these and still resume.
_NON_IDENTITY_KEYS = (
    "mode",
    "progress",
    "logger",
    "report",
    "data.workers",
    "data.cache_dir",
    "bench_data",
    "train.log_every",
    "train.eval_batch_size",
    "head.max_state_mb",  # how the fast simulator splits the batch, not what it computes
    "head.native_kernel",  # how the fast simulator gets gradients, not what they are
    "bench_circuit",
    "bench_step",
)


def config_dict(cfg: QtlConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able containers (what W&B and run_config.json get)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _identity(cfg: QtlConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", config_dict(cfg))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == s or k.startswith(s + ".") for s in _NON_IDENTITY_KEYS)
    }


def fingerprint(cfg: QtlConfig) -> str:
    """Hash of everything that determines a run's result."""
    blob = json.dumps(_identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_run_dir(cfg: QtlConfig, run_dir: Path, path: Path) -> None:
    """Refuse a run directory started with another config; record the config otherwise."""
    mine = _identity(cfg)
    if path.exists():
        theirs = json.loads(path.read_text()).get("identity", {})
        if theirs != mine:
            diffs = [
                f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
                for k in sorted(set(theirs) | set(mine))
                if theirs.get(k) != mine.get(k)
            ]
            raise ConfigError(
                f"run directory {run_dir} belongs to a run with a different config "
                f"({'; '.join(diffs[:6])}). Nothing was changed there. Pick another "
                "experiment name (name=...) or hydra.run.dir=..., or delete that directory "
                "to start it over."
            )
    else:
        payload = {"fingerprint": fingerprint(cfg), "identity": mine, "config": config_dict(cfg)}
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def describe(cfg: QtlConfig) -> list[tuple[str, int]]:
    """Print the parameter table per component (no weights allocated, no training)."""
    from qtl.models.classifier import abstract_model, parameter_table

    rows = parameter_table(abstract_model(cfg), cfg)
    n = len(cfg.task.labels)
    print(
        f"qtl model: task={cfg.task.name} ({n} labels) head={cfg.head.name.value} "
        f"backbone={cfg.backbone.name}"
        + (f" depth={cfg.head.depth} qubits={n}" if cfg.head.name == HeadName.dqc else "")
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'component':<{width}}  {'parameters':>12}")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>12,}")
    return rows


def format_auroc_table(results: dict[str, Any]) -> str:
    """Per-label AUROC per evaluated split, as a fixed-width text table."""
    splits = [s for s in ("val", "test", "external") if s in results["auroc"]]
    labels = results["labels"]
    width = max(len(x) for x in [*labels, "mean"])
    lines = [f"{'label':<{width}}  " + "  ".join(f"{s:>8}" for s in splits)]
    for name in [*labels, "mean"]:
        cells = []
        for s in splits:
            block = results["auroc"][s]
            value = block["mean"] if name == "mean" else block["per_label"].get(name)
            cells.append(f"{value:8.3f}" if value is not None else f"{'n/a':>8}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def train_and_evaluate(cfg: QtlConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume) a run in ``run_dir``, evaluate its best checkpoint, write records."""
    validate(cfg)
    from qtl.backends import refuse_training

    refuse_training(cfg)
    from qtl.record.files import RunFiles

    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    _check_run_dir(cfg, run_dir, files.config)
    done = files.read_results()
    if done is not None:
        print(f"[qtl] {run_dir}: finished already (results.json) - nothing to train.")
        print(format_auroc_table(done))
        return done
    return _train(cfg, run_dir, files)


def _train(cfg: QtlConfig, run_dir: Path, files: Any) -> dict[str, Any]:
    import jax

    from qtl.data.cache import cached_splits, write_skipped
    from qtl.data.source import load_splits
    from qtl.evaluate.metrics import mean_auroc, per_label_auroc
    from qtl.evaluate.predict import predict
    from qtl.models.classifier import build_model, parameter_table
    from qtl.record.files import write_json_atomic
    from qtl.record.loggers import make_logger
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.loop import Progress, fit
    from qtl.train.step import init_state, make_steps

    show = want_progress(cfg.progress)
    t_start = time.perf_counter()
    labels = list(cfg.task.labels)
    model = build_model(cfg, cfg.seed)  # first: a weights problem fails before any data work
    table = parameter_table(model, cfg)
    splits = load_splits(cfg.data, labels, progress=show, check_files=False)
    t_data = time.perf_counter()
    cached = cached_splits(cfg.data, splits, progress=show)  # fills what the cache lacks
    splits = cached.splits  # without the images skipped by data.on_bad_image=skip
    if cached.skipped_ids():
        write_skipped(run_dir / "skipped_images.json", cached)
    arrays: dict[str, tuple[Any, np.ndarray]] = {
        name: (cached.images[name], split.labels.astype(np.float32))
        for name, split in splits.items()
    }
    data_seconds = time.perf_counter() - t_data

    steps = make_steps(model, cfg)
    state = init_state(model, cfg, steps.tx)
    del model
    ckpts = Checkpoints(run_dir / "checkpoints")
    progress = Progress()
    if ckpts.latest_epoch("last") is not None:
        state, meta = ckpts.restore("last", state)
        progress = Progress.from_json(meta)
        files.write_metrics(progress.history)
        mid = f"and {progress.batch} batches of epoch {progress.epoch + 1} " * (progress.batch > 0)
        print(
            f"[qtl] resuming {run_dir} after epoch {progress.epoch} {mid}"
            f"(best epoch {progress.best_epoch}, val loss {progress.best_val_loss:.4f})"
        )

    run_name = f"{cfg.name}/{cfg.task.name}-{cfg.head.name.value}/seed{cfg.seed}"
    logger = make_logger(cfg, run_dir, config_dict(cfg), run_name)
    exit_code = 1
    try:
        state, progress = fit(
            cfg, steps, state, progress, arrays, ckpts, files, logger, show_progress=show
        )
        t_eval = time.perf_counter()
        best, _ = ckpts.restore("best", state)
        auroc: dict[str, Any] = {}
        losses: dict[str, float] = {}
        for name, (images, y) in arrays.items():
            if name == "train":
                continue
            probs, loss = predict(
                steps.eval_step,
                best,
                images,
                y,
                cfg.train.eval_batch_size,
                desc=f"eval {name}",
                progress=show,
            )
            per_label = per_label_auroc(y, probs, labels)
            auroc[name] = {"mean": mean_auroc(per_label), "per_label": per_label}
            losses[name] = loss
            files.write_predictions(name, splits[name].ids, y, probs, labels)
        results = {
            "run": run_name,
            "task": cfg.task.name,
            "head": cfg.head.name.value,
            "seed": cfg.seed,
            "labels": labels,
            "fingerprint": fingerprint(cfg),
            "config": config_dict(cfg),
            "parameters": dict(table),
            "epochs": progress.epoch,
            "best_epoch": progress.best_epoch,
            "stopped": progress.stopped,
            "best_val_loss": progress.best_val_loss,
            "final_val_loss": progress.history[-1]["val_loss"] if progress.history else None,
            "loss": losses,
            "auroc": auroc,
            "split_sizes": {name: len(s) for name, s in splits.items()},
            # positives per label in train: the report sorts labels by this frequency
            "train_label_counts": dict(
                zip(labels, (int(c) for c in splits["train"].labels.sum(axis=0)), strict=True)
            ),
            "skipped_images": cached.skipped_ids(),
            "wall_seconds": {
                "data": round(data_seconds, 2),
                "train": round(progress.train_seconds, 2),
                "evaluate": round(time.perf_counter() - t_eval, 2),
                "this_session": round(time.perf_counter() - t_start, 2),
            },
            "hardware": {
                "device": str(jax.devices()[0].device_kind),
                "platform": jax.default_backend(),
                "host": platform.node(),
                "cpus": os.cpu_count(),
            },
            "wandb_run_id": getattr(logger, "run_id", None),
        }
        write_json_atomic(files.results, results)
        logger.summary(
            {f"{s}/mean_auroc": a["mean"] for s, a in auroc.items()}
            | {f"{s}/auroc/{k}": v for s, a in auroc.items() for k, v in a["per_label"].items()}
            | {"best_epoch": progress.best_epoch, "best_val_loss": progress.best_val_loss}
        )
        exit_code = 0
    finally:
        logger.finish(exit_code)
        ckpts.close()
    print(
        f"[qtl] {run_name}: best epoch {progress.best_epoch}/{progress.epoch} "
        f"({progress.stopped}); results in {run_dir}"
    )
    print(format_auroc_table(results))
    return results


def run(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    """Dispatch on ``cfg.mode``."""
    if cfg.mode == Mode.describe:
        validate(cfg)
        return describe(cfg)
    if cfg.mode == Mode.bench_circuit:
        from qtl.bench.circuit import bench_circuit

        return bench_circuit(cfg.bench_circuit, cfg.head)
    if cfg.mode == Mode.bench_step:
        from qtl.bench.step import bench_step

        validate(cfg)
        return bench_step(cfg)
    if cfg.mode == Mode.report:  # reads a sweep's records; no run directory, no training
        from qtl.report import write_report

        return write_report(cfg.report, cfg.logger)
    if cfg.mode == Mode.cache:
        from qtl.data.cache import build

        validate(cfg)
        return build(cfg, run_dir)
    if cfg.mode == Mode.bench_data:
        from qtl.data.bench import bench_data

        validate(cfg)
        return bench_data(cfg, run_dir)
    if run_dir is None:
        raise ValueError("mode=train needs a run directory")
    return train_and_evaluate(cfg, run_dir)
