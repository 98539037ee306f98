"""A training run's life - identity check, train (or resume), evaluate, record.

``train_and_evaluate(cfg, run_dir, study)`` is the whole life of a run and is safe to call again
on the same directory: a finished run is reported, not retrained; an interrupted one resumes
from its last checkpoint; a directory that belongs to a different config is refused.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qtl.config import QtlConfig, validate
from qtl.progress import want_progress
from qtl.record.identity import check_run_dir, config_dict, fingerprint, run_provenance
from qtl.record.schema import Results, SplitScores
from qtl.utils import distributed
from qtl.utils.errors import QtlError
from qtl.utils.runlock import one_process_per_run


class Study(Protocol):
    """What the driver asks of a run's study (:class:`qtl.studies.base.Study` implements it;
    the driver never asks which study it is)."""

    name: str

    def validate(self, cfg: QtlConfig) -> None: ...
    def identity_keys(self, keys: list[str]) -> list[str]: ...
    def data_content(self, cfg: QtlConfig) -> dict[str, str]: ...
    def provenance(self, cfg: QtlConfig, **start: Any) -> dict[str, Any]: ...
    def inputs(self, cfg: QtlConfig, run_dir: Path, show: bool, **start: Any) -> RunInputs: ...
    def run_label(self, cfg: Any) -> str: ...
    def wandb_tags(self, cfg: QtlConfig) -> list[str]: ...
    def format_scores(self, results: Results) -> str: ...


@one_process_per_run  # a second process on this run refuses (or waits): qtl.utils.runlock
def train_and_evaluate(cfg: QtlConfig, run_dir: Path, study: Study, **start: Any) -> dict[str, Any]:
    """Train (or resume) a run of ``study`` in ``run_dir``, evaluate its best checkpoint,
    write records.

    ``start``: what the run starts from as the study resolved it before (``study.start``:
    the backbone's weights, a teacher's logits); passed on to ``study.inputs``.
    """
    study.validate(cfg)  # the other study's fields named as such, before the shared checks
    validate(cfg)
    from qtl.record.files import RunFiles

    run_dir = Path(run_dir)
    if not distributed.is_primary():
        return _follow(cfg, run_dir, study, start)
    files = RunFiles(run_dir)
    try:
        check_run_dir(
            cfg,
            run_dir,
            files.config,
            study=study,
            provenance=lambda: study.provenance(cfg, **start),
        )
        done = files.read_results()
        if done is not None:
            distributed.verdict(distributed.FINISHED)
            print(f"[qtl] {run_dir}: finished already (results.json) - nothing to train.")
            print(study.format_scores(done))
            return done.to_json()
        failed = files.read_failure()
        if failed is not None:  # deterministic: the same command would fail the same way
            from qtl.train.preempt import TrainingDiverged

            raise TrainingDiverged(
                f"run {run_dir} failed before and is not retrained: "
                f"{failed.message or failed.reason} To retry with other settings, "
                "start a new run (e.g. name=<new name> train.lr=<lower>); to retry this one "
                f"unchanged (after a code fix), delete {files.failed} and rerun: it resumes "
                "from its last good checkpoint."
            )
    except QtlError as err:  # the run's other processes stop with the same status
        distributed.verdict(err.exit_code)
        raise
    except BaseException:
        distributed.verdict(1)
        raise
    distributed.verdict(distributed.TRAIN)
    return _train(cfg, run_dir, files, study, start)


class PrimaryStopped(QtlError):
    """Process 0 of a multi-process run refused it or found it finished with an error; the
    other processes exit with its status (its output says why)."""


def _follow(cfg: QtlConfig, run_dir: Path, study: Study, start: dict[str, Any]) -> dict[str, Any]:
    """A process other than 0 of a multi-process run: train as process 0 decides, writing
    nothing of the record (``qtl.utils.distributed``)."""
    from qtl.config import AugmentOn
    from qtl.data.augment import resolve_augment_on
    from qtl.record.files import PeerFiles

    files = PeerFiles(run_dir)
    said = distributed.verdict()
    if said == distributed.FINISHED:
        done = files.read_results()
        return {} if done is None else done.to_json()
    if said != distributed.TRAIN:
        err = PrimaryStopped(
            f"process 0 of this run stopped it before training (exit status {said}); its "
            f"output says why. Nothing was changed in {run_dir} by this process."
        )
        err.exit_code = said  # type: ignore[misc]
        raise err
    recorded = (files.read_run_config() or {}).get("identity", {}).get("data.augment_on")
    if cfg.data.augment_on == AugmentOn.auto:  # the placement process 0 recorded (or chose)
        cfg.data.augment_on = AugmentOn(recorded) if recorded else resolve_augment_on(cfg.data)
    return _train(cfg, run_dir, files, study, start)


@dataclass
class RunInputs:
    """What a study's data and model give the common part of a run (``Study.inputs``)."""

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


def run_name(cfg: QtlConfig, study: Study) -> str:
    """``<name>/<the study's run label>/seed<seed>``: the run's folder under the outputs."""
    return f"{cfg.name}/{study.run_label(cfg)}/seed{cfg.seed}"


def _train(
    cfg: QtlConfig, run_dir: Path, files: Any, study: Study, start: dict[str, Any]
) -> dict[str, Any]:
    import jax

    from qtl.evaluate.predict import predict
    from qtl.record.loggers import make_logger
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.loop import Progress, fit
    from qtl.train.step import init_state, make_steps
    from qtl.utils import faults
    from qtl.utils.mesh import resolve

    show = want_progress(cfg.progress) and distributed.is_primary()
    tc = cfg.train
    topology = resolve(
        tc.devices,
        [("train.batch_size", tc.batch_size), ("train.eval_batch_size", tc.eval_batch_size)],
    )
    several = topology.processes > 1  # every process takes part in every save and evaluation
    t_start = time.perf_counter()
    inputs = study.inputs(cfg, run_dir, show, **start)
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
    ckpts = Checkpoints(run_dir / "checkpoints", topology.replicated() if several else None)
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

    name = run_name(cfg, study)
    # synthetic | real, from the data the study opened: a synthetic run is tagged so in W&B
    source = inputs.record.get("data_source")
    tags = [*study.wandb_tags(cfg), *([source] if source == "synthetic" else [])]
    if distributed.is_primary():
        logger = make_logger(
            cfg, run_dir, config_dict(cfg) | {"data_source": source}, name, study.run_label(cfg),
            tags,
        )
    else:
        from qtl.record.loggers import NullLogger

        logger = NullLogger()
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
                **(
                    {
                        "shard": topology.shard,
                        "rows": topology.rows(cfg.train.eval_batch_size),
                        "gather": topology.gather,
                    }
                    if several
                    else {}
                ),
            )
            mean, per_label, extra = steps.objective.score(y, probs, inputs.label_names)
            if extra:  # the study's own metrics (its AUC among them)
                metrics[split] = extra
            else:  # AUROC per label and its mean
                auroc[split] = SplitScores(mean=mean, per_label=per_label)
            losses[split] = loss
            files.write_predictions(
                split, inputs.ids[split], y, probs, inputs.label_names, inputs.score_names
            )
            faults.point("between_predictions")
        results = Results(
            run=name,
            seed=cfg.seed,
            labels=inputs.label_names,
            fingerprint=fingerprint(cfg, study),
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
            study=study.name,
            label=study.run_label(cfg),
            **inputs.record,
        )
        files.write_results(results)
        logger.summary(
            {f"{s}/mean_auroc": a.mean for s, a in auroc.items()}
            | {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()}
            | {f"{s}/auroc/{k}": v for s, a in auroc.items() for k, v in a.per_label.items()}
            | {"best_epoch": progress.best_epoch, "best_val_loss": progress.best_val_loss}
            | {"data_source": source}
        )
        exit_code = 0
    finally:
        logger.finish(exit_code)
        ckpts.close()
    print(
        f"[qtl] {name}: best epoch {progress.best_epoch}/{progress.epoch} "
        f"({progress.stopped}); results in {run_dir}"
        + (" (synthetic data)" if source == "synthetic" else "")
    )
    print(study.format_scores(results))
    return results.to_json()
