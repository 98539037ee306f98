"""A training run's life - identity check, train (or resume), evaluate, record.

``train_and_evaluate(cfg, run_dir)`` is the whole life of a run and is safe to call again
on the same directory: a finished run is reported, not retrained; an interrupted one resumes
from its last checkpoint; a directory that belongs to a different config is refused.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import QtlConfig, validate
from qtl.progress import want_progress
from qtl.record.identity import check_run_dir, config_dict, fingerprint, run_provenance
from qtl.record.schema import Results, SplitScores


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


def train_and_evaluate(
    cfg: QtlConfig, run_dir: Path, *, weights: str | None = None
) -> dict[str, Any]:
    """Train (or resume) a run in ``run_dir``, evaluate its best checkpoint, write records.

    ``weights``: the backbone's starting weights as the application resolved them (a hub id
    or a folder; ``backbone.pretrained`` when None).
    """
    validate(cfg)
    from qtl.record.files import RunFiles

    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    check_run_dir(cfg, run_dir, files.config, weights=weights)
    done = files.read_results()
    if done is not None:
        print(f"[qtl] {run_dir}: finished already (results.json) - nothing to train.")
        print(format_auroc_table(done))
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
    return _train(cfg, run_dir, files, weights)


def _train(cfg: QtlConfig, run_dir: Path, files: Any, weights: str | None) -> dict[str, Any]:
    import jax

    from qtl.data.cache import cached_splits, write_skipped
    from qtl.data.source import load_splits
    from qtl.evaluate.metrics import mean_auroc, per_label_auroc
    from qtl.evaluate.predict import predict
    from qtl.models.classifier import build_model, parameter_table
    from qtl.record.loggers import make_logger
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.loop import Progress, fit
    from qtl.train.step import init_state, make_steps
    from qtl.utils import faults, paths

    show = want_progress(cfg.progress)
    t_start = time.perf_counter()
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
    data_seconds = time.perf_counter() - t_data

    if cfg.features.cache:  # the head is the model: the backbone never runs again
        from qtl.train.features import init_feature_state, make_feature_steps

        steps = make_feature_steps(model.head, cfg)
        state = init_feature_state(model.head, steps.tx)
    else:
        steps = make_steps(model, cfg)
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

    run_name = f"{cfg.name}/{cfg.task.name}-{cfg.head.name.value}/seed{cfg.seed}"
    logger = make_logger(cfg, run_dir, config_dict(cfg), run_name)
    exit_code = 1
    try:
        state, progress = fit(
            cfg, steps, state, progress, arrays, ckpts, files, logger, show_progress=show
        )
        t_eval = time.perf_counter()
        best, _ = ckpts.restore("best", state, step=progress.best_epoch)
        faults.point("evaluate")
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
            auroc[name] = SplitScores(mean=mean_auroc(per_label), per_label=per_label)
            losses[name] = loss
            files.write_predictions(name, splits[name].ids, y, probs, labels)
            faults.point("between_predictions")
        results = Results(
            run=run_name,
            task=cfg.task.name,
            head=cfg.head.name.value,
            seed=cfg.seed,
            labels=labels,
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
            split_sizes={name: len(s) for name, s in splits.items()},
            # positives per label in train: the report sorts labels by this frequency
            train_label_counts=dict(
                zip(labels, (int(c) for c in splits["train"].labels.sum(axis=0)), strict=True)
            ),
            skipped_images=cached.skipped_ids(),
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
        )
        files.write_results(results)
        logger.summary(
            {f"{s}/mean_auroc": a.mean for s, a in auroc.items()}
            | {f"{s}/auroc/{k}": v for s, a in auroc.items() for k, v in a.per_label.items()}
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
    return results.to_json()
