"""A training run's life - identity check, train (or resume), evaluate, record.

``train_and_evaluate(cfg, run_dir)`` is the whole life of a run and is safe to call again
on the same directory: a finished run is reported, not retrained; an interrupted one resumes
from its last checkpoint; a directory that belongs to a different config is refused.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import DataName, QtlConfig, validate
from qtl.progress import want_progress
from qtl.record.identity import check_run_dir, config_dict, fingerprint, run_provenance
from qtl.record.schema import Results, SplitScores
from qtl.utils.runlock import one_process_per_run


def format_auroc_table(results: Results) -> str:
    """Per-label AUROC per evaluated split, as a fixed-width text table."""
    splits = [s for s in ("val", "test", "external") if s in results.auroc]
    labels = results.labels
    width = max(len(x) for x in [*labels, "mean"])
    lines = [f"{'label':<{width}}  " + "  ".join(f"{s:>8}" for s in splits)]
    for name in [*labels, "mean"]:
        cells = []
        for s in splits:
            block = results.auroc[s]
            value = block.mean if name == "mean" else block.per_label.get(name)
            cells.append(f"{value:8.3f}" if value is not None else f"{'n/a':>8}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def format_medmnist_table(results: Results) -> str:
    """AUC and ACC per evaluated split of a MedMNIST run."""
    lines = [f"{'split':<6}  {'AUC':>7}  {'ACC':>7}"]
    for split, m in results.metrics.items():
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        lines.append(f"{split:<6}  {auc:>7}  {m['acc']:7.3f}")
    return "\n".join(lines)


def format_scores(results: Results) -> str:
    """The finished run's scores as printed at its end."""
    if results.study == "medmnist":
        return format_medmnist_table(results)
    return format_auroc_table(results)


@one_process_per_run  # a second process on this run refuses (or waits): qtl.utils.runlock
def train_and_evaluate(
    cfg: QtlConfig, run_dir: Path, *, weights: str | None = None, teacher: Any = None
) -> dict[str, Any]:
    """Train (or resume) a run in ``run_dir``, evaluate its best checkpoint, write records.

    ``weights``: the backbone's starting weights as the application resolved them (a hub id
    or a folder; ``backbone.pretrained`` when None). ``teacher``: for ``distill`` other than
    none, the teacher's logits (:class:`qtl.train.medmnist.TeacherLogits`), resolved by the
    application like the weights.
    """
    validate(cfg)
    from qtl.record.files import RunFiles

    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    check_run_dir(cfg, run_dir, files.config, weights=weights)
    done = files.read_results()
    if done is not None:
        print(f"[qtl] {run_dir}: finished already (results.json) - nothing to train.")
        print(format_scores(done))
        return done.to_json()
    failed = files.read_failure()
    if failed is not None:  # deterministic: the same command would fail the same way
        from qtl.train.preempt import TrainingDiverged

        raise TrainingDiverged(
            f"run {run_dir} failed before and is not retrained: "
            f"{failed.message or failed.reason} To retry with other settings, "
            "start a new run (e.g. name=<new name> train.lr=<lower>); to retry this one "
            f"unchanged (after a code fix), delete {files.failed} and rerun: it resumes from "
            "its last good checkpoint."
        )
    return _train(cfg, run_dir, files, weights, teacher)


@dataclass
class _Inputs:
    """What one study's data and model give the common part of a run."""

    model: Any
    table: list[tuple[str, int]]
    arrays: dict[str, tuple[Any, np.ndarray]]  # the loop's (images, targets) per split
    labels: dict[str, np.ndarray]  # the labels alone per split (KD targets carry more)
    ids: dict[str, Any]
    label_names: list[str]
    score_names: list[str] | None
    objective: Any
    data_seconds: float
    record: dict[str, Any]  # the study's own Results fields
    skipped: dict[str, list[str]] = field(default_factory=dict)


def _cxr_inputs(cfg: QtlConfig, run_dir: Path, weights: str | None, show: bool) -> _Inputs:
    from qtl.data.cache import cached_splits, write_skipped
    from qtl.data.source import load_splits
    from qtl.models.classifier import build_model, parameter_table
    from qtl.utils import paths

    labels = list(cfg.task.labels)
    model = build_model(cfg, cfg.seed, weights=weights)  # a weights problem: before data work
    table = parameter_table(model, cfg)
    splits = load_splits(
        cfg.data, labels, progress=show, check_files=False, data_dir=paths.data_dir(cfg.paths)
    )
    t_data = time.perf_counter()
    if cfg.features.cache:  # frozen backbone: the head trains on features computed once
        from qtl.train.features import cached_features

        cached = cached_features(cfg, model.backbone, splits, progress=show)
    else:
        cached = cached_splits(cfg.data, splits, progress=show)  # fills what the cache lacks
    splits = cached.splits  # without the images skipped by data.on_bad_image=skip
    if cached.skipped_ids():
        write_skipped(run_dir / "skipped_images.json", cached)
    arrays: dict[str, tuple[Any, np.ndarray]] = {
        name: (cached.images[name], split.labels.astype(np.float32))
        for name, split in splits.items()
    }
    return _Inputs(
        model=model,
        table=table,
        arrays=arrays,
        labels={name: y for name, (_, y) in arrays.items()},
        ids={name: split.ids for name, split in splits.items()},
        label_names=labels,
        score_names=None,
        objective=None,
        data_seconds=time.perf_counter() - t_data,
        record={
            "task": cfg.task.name,
            "head": cfg.head.name.value,
            # positives per label in train: the report sorts labels by this frequency
            "train_label_counts": dict(
                zip(labels, (int(c) for c in splits["train"].labels.sum(axis=0)), strict=True)
            ),
        },
        skipped=cached.skipped_ids(),
    )


def _medmnist_inputs(cfg: QtlConfig, teacher: Any) -> _Inputs:
    from qtl.train.medmnist import label_names, medmnist_inputs, score_names
    from qtl.utils import paths

    t_data = time.perf_counter()
    got = medmnist_inputs(cfg, paths.data_dir(cfg.paths), teacher)
    names = label_names(got.info)
    return _Inputs(
        model=got.model,
        table=got.table,
        arrays=got.arrays,
        labels=got.labels,
        ids=got.ids,
        label_names=names,
        score_names=score_names(got.info, got.outputs),
        objective=got.objective,
        data_seconds=time.perf_counter() - t_data,
        record={
            "task": cfg.data.flag,
            "head": str(cfg.model.name),
            "study": "medmnist",
            "model": str(cfg.model.name),
            "dataset": cfg.data.flag,
            "task_type": got.info.task.value,
            "distill": str(cfg.distill.mode),
            "teacher": dict(teacher.record) if teacher is not None else {},
            "costs": got.costs,
            "train_label_counts": {
                n: int(c) for n, c in zip(names, got.labels["train"].sum(axis=0), strict=True)
            },
        },
    )


def run_name(cfg: QtlConfig) -> str:
    """``<name>/<task>-<head>/seed<seed>`` (MedMNIST: ``<name>/<flag>-<model>[-kd_*]/...``)."""
    from qtl.config import run_subdir

    return f"{cfg.name}/{run_subdir(cfg)}"


def _train(
    cfg: QtlConfig, run_dir: Path, files: Any, weights: str | None, teacher: Any
) -> dict[str, Any]:
    import jax

    from qtl.evaluate.predict import predict
    from qtl.record.loggers import make_logger
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.loop import Progress, fit
    from qtl.train.step import init_state, make_steps
    from qtl.utils import faults

    show = want_progress(cfg.progress)
    t_start = time.perf_counter()
    if cfg.data.name == DataName.medmnist:
        inputs = _medmnist_inputs(cfg, teacher)
    else:
        inputs = _cxr_inputs(cfg, run_dir, weights, show)
    model, table, arrays = inputs.model, inputs.table, inputs.arrays
    data_seconds = inputs.data_seconds

    if cfg.features.cache:  # the head is the model: the backbone never runs again
        from qtl.train.features import init_feature_state, make_feature_steps

        steps = make_feature_steps(model.head, cfg)
        state = init_feature_state(model.head, steps.tx)
    else:
        steps = make_steps(model, cfg, inputs.objective)
        state = init_state(model, cfg, steps.tx)
    del model
    ckpts = Checkpoints(run_dir / "checkpoints")
    progress = Progress()
    last = ckpts.latest_epoch("last")
    if last is not None:
        state, meta = ckpts.restore("last", state)
        progress = Progress.from_json(meta)
        ckpts.prune(last=last, best=progress.best_epoch or None)  # what a crash left over
        files.write_metrics(progress.history)
        mid = f"and {progress.batch} batches of epoch {progress.epoch + 1} " * (progress.batch > 0)
        print(
            f"[qtl] resuming {run_dir} after epoch {progress.epoch} {mid}"
            f"(best epoch {progress.best_epoch}, val loss {progress.best_val_loss:.4f})"
        )

    name = run_name(cfg)
    logger = make_logger(cfg, run_dir, config_dict(cfg), name)
    exit_code = 1
    try:
        state, progress = fit(
            cfg, steps, state, progress, arrays, ckpts, files, logger, show_progress=show
        )
        t_eval = time.perf_counter()
        best, _ = ckpts.restore("best", state, step=progress.best_epoch)
        faults.point("evaluate")
        auroc: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        losses: dict[str, float] = {}
        for split, (images, _) in arrays.items():
            if split == "train":
                continue
            y = inputs.labels[split]
            probs, loss = predict(
                steps.eval_step,
                best,
                images,
                y,
                cfg.train.eval_batch_size,
                desc=f"eval {split}",
                progress=show,
            )
            mean, per_label, extra = steps.objective.score(y, probs, inputs.label_names)
            auroc[split] = SplitScores(mean=mean, per_label=per_label)
            if extra:
                metrics[split] = extra
            losses[split] = loss
            files.write_predictions(
                split, inputs.ids[split], y, probs, inputs.label_names, inputs.score_names
            )
            faults.point("between_predictions")
        results = Results(
            run=name,
            seed=cfg.seed,
            labels=inputs.label_names,
            fingerprint=fingerprint(cfg),
            config=config_dict(cfg),
            parameters=dict(table),
            epochs=progress.epoch,
            best_epoch=progress.best_epoch,
            stopped=progress.stopped,
            best_val_loss=progress.best_val_loss,
            final_val_loss=progress.history[-1]["val_loss"] if progress.history else None,
            loss=losses,
            auroc=auroc,
            metrics=metrics,
            split_sizes={split: len(y) for split, y in inputs.labels.items()},
            skipped_images=inputs.skipped,
            wall_seconds={
                "data": round(data_seconds, 2),
                "train": round(progress.train_seconds, 2),
                "evaluate": round(time.perf_counter() - t_eval, 2),
                "this_session": round(time.perf_counter() - t_start, 2),
            },
            hardware={
                "device": str(jax.devices()[0].device_kind),
                "platform": jax.default_backend(),
                "host": platform.node(),
                "cpus": os.cpu_count(),
            },
            wandb_run_id=getattr(logger, "run_id", None),
            provenance=run_provenance(cfg, files.config),  # weights loaded, sessions' runtime
            **inputs.record,
        )
        files.write_results(results)
        logger.summary(
            {f"{s}/mean_auroc": a.mean for s, a in auroc.items()}
            | {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()}
            | {f"{s}/auroc/{k}": v for s, a in auroc.items() for k, v in a.per_label.items()}
            | {"best_epoch": progress.best_epoch, "best_val_loss": progress.best_val_loss}
        )
        exit_code = 0
    finally:
        logger.finish(exit_code)
        ckpts.close()
    print(
        f"[qtl] {name}: best epoch {progress.best_epoch}/{progress.epoch} "
        f"({progress.stopped}); results in {run_dir}"
    )
    print(format_scores(results))
    return results.to_json()
