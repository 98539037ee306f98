"""The epoch loop: train, validate, checkpoint, stop early — resumable at every moment.

Order inside an epoch: train over all batches -> validation loss -> save `best` (if the
epoch improved) -> save `last`, the commit -> prune what it superseded -> rewrite
metrics.jsonl from the checkpointed history. A kill anywhere loses at most the epoch in
progress; the rerun restores `last` and continues with the next epoch, with the same batches
it would have seen (the stream is a function of seed and epoch only). Why every crash window
between those steps is safe: ``qtl.train.checkpoint``.

A scheduler's stop signal (SLURM preemption or time limit, see ``qtl.train.preempt``) loses
nothing: after the current step, `last` is saved with the position inside the epoch and the
losses so far; the resumed run skips the batches already trained and finishes the epoch
exactly as an uninterrupted run would. `last` is keyed by the global step, so a mid-epoch
save and the following epoch-end save never collide.

A non-finite loss, gradient or weight stops training (:class:`TrainingDiverged`): the step
returns a NaN loss for it, and every save is preceded by a check of all losses since the
last one, so a bad update is never checkpointed. The failure is recorded in failed.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np

from qtl.config import BestBy, QtlConfig
from qtl.data.augment import augment_host, placement
from qtl.data.loader import WaitClock, batches, num_batches
from qtl.evaluate.predict import predict
from qtl.progress import bar
from qtl.record.files import EpochRow, Failure, RunFiles
from qtl.train.checkpoint import Checkpoints
from qtl.train.preempt import STOP_SIGNALS, StopRequest, TrainingDiverged
from qtl.train.step import Steps, TrainState
from qtl.utils import faults
from qtl.utils.distributed import any_process
from qtl.utils.mesh import Topology, resolve


@dataclass
class Progress:
    """Loop bookkeeping stored with every checkpoint."""

    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_val_loss: float = float("inf")  # the best epoch's validation loss
    best_val_auc: float | None = None  # the best epoch's validation AUC (train.best_by=val_auc)
    bad_epochs: int = 0
    stopped: str | None = None  # why training ended: early_stopping | max_epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    # a mid-epoch checkpoint (stop signal): batches of epoch `epoch + 1` already trained,
    # their losses and seconds; all empty at epoch boundaries
    batch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["best_val_loss"] = None if np.isinf(self.best_val_loss) else self.best_val_loss
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Progress:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if d.get("best_val_loss") is None:
            d["best_val_loss"] = float("inf")
        return cls(**d)


class _Losses:
    """One epoch's batch losses: fetched and checked, and still on the device.

    The jitted step runs ahead of the host; fetching only at log points and before a save
    keeps it so, and the first non-finite loss is still found by its batch.
    """

    def __init__(self, done: list[float]):
        self.done = list(done)
        self.pending: list[Any] = []

    def check(self) -> int | None:
        """Fetch the pending losses; the index of the first non-finite batch, if any."""
        fetched = [float(x) for x in jax.device_get(self.pending)]
        self.pending = []
        for x in fetched:
            if not np.isfinite(x):
                return len(self.done)
            self.done.append(x)
        return None


def _diverged(
    cfg: QtlConfig,
    files: RunFiles,
    *,
    epoch: int,
    batch: int | None,
    n_batches: int,
    step: int | None,
    recent: list[float],
    last_good: str,
) -> TrainingDiverged:
    """Record the failure in failed.json and build the error that ends the run."""
    tc = cfg.train
    where = f"epoch {epoch}, batch {batch} of {n_batches}" if batch else f"epoch {epoch}"
    what = "the training loss, a gradient or an updated weight" if batch else "the validation loss"
    shown = ", ".join(f"{x:.4g}" for x in recent[-5:]) or "none"
    backbone_lr = "null (= train.lr)" if tc.backbone_lr is None else f"{tc.backbone_lr:g}"
    message = (
        f"training diverged at {where}: {what} is not finite (NaN/Inf); training losses "
        f"before it: {shown}. Most likely the learning rate is too high: train.lr={tc.lr:g}, "
        f"train.backbone_lr={backbone_lr} (train.optimizer={tc.optimizer}). Nothing after "
        f"{last_good} was saved; the failure is recorded in {files.failed}."
    )
    files.write_failure(
        Failure(
            reason="non_finite",
            summary=(
                f"training diverged at {where} (NaN/Inf; train.lr={tc.lr:g}, "
                f"train.backbone_lr={backbone_lr})"
            ),
            message=message,
            epoch=epoch,
            batch=batch,
            step=step,
            recent_losses=recent[-5:],
            knobs={
                "train.lr": tc.lr,
                "train.backbone_lr": tc.backbone_lr,
                "train.optimizer": tc.optimizer,
            },
            last_good_checkpoint=last_good,
        )
    )
    return TrainingDiverged(message)


@dataclass
class _Fit:
    """One run's training: the four steps of an epoch, each a method a reader can follow.

    ``train_epoch`` (batches, loss checks, a stop signal's mid-epoch save) -> ``validate``
    (validation loss and score) -> ``improve`` (best epoch, patience, why training ends) ->
    ``commit`` (history row, log, `best` then `last`, prune, metrics.jsonl).
    """

    cfg: QtlConfig
    steps: Steps
    data: dict[str, tuple[Any, np.ndarray]]
    ckpts: Checkpoints
    files: RunFiles
    logger: Any
    p: Progress
    show_progress: bool
    n_batches: int = 0
    transform: Any = None
    topology: Topology = field(default_factory=Topology)

    def __post_init__(self) -> None:
        tc = self.cfg.train
        train_x, _ = self.data["train"]
        self.n_batches = num_batches(len(train_x), tc.batch_size)
        self.topology = resolve(
            tc.devices,
            [("train.batch_size", tc.batch_size), ("train.eval_batch_size", tc.eval_batch_size)],
        )
        if placement(self.cfg.data) == "host":
            pool = getattr(train_x, "pool", None)  # the image cache's reader threads, when cached
            part = self.rows(tc.batch_size)  # several processes: this one's rows of a batch
            self.transform = partial(
                augment_host,
                hflip_p=self.cfg.data.hflip_p,
                max_rotation_deg=self.cfg.data.max_rotation_deg,
                pool=pool,
                rows=None if part is None else (*part, tc.batch_size),
            )

    def rows(self, batch_size: int) -> tuple[int, int] | None:
        """This process's rows of every batch (None: one process reads the whole batch)."""
        return self.topology.rows(batch_size) if self.topology.processes > 1 else None

    def stopping(self, stop: StopRequest, sync_point: bool) -> bool:
        """Whether to checkpoint and hand over to the scheduler now. One process: after any
        step once signalled. Several: only at a sync point (a log point, an epoch's end),
        where they agree - all stop at the same step if any was signalled."""
        if self.topology.processes == 1:
            return stop.signum is not None
        if not sync_point or not any_process(stop.signum is not None):
            return False
        if stop.signum is None:  # a peer was signalled, not this process: stop as it does
            stop.signum = int(STOP_SIGNALS[0])
        return True

    def last_good(self) -> str:
        p = self.p
        if p.batch:
            return f"the checkpoint at batch {p.batch} of epoch {p.epoch + 1}"
        return f"the checkpoint after epoch {p.epoch}" if p.epoch else "the start (no checkpoint)"

    def diverged(self, epoch: int, batch: int | None, step: int, recent: list[float]):
        return _diverged(
            self.cfg,
            self.files,
            epoch=epoch,
            batch=batch,
            n_batches=self.n_batches,
            step=step,
            recent=recent,
            last_good=self.last_good(),
        )

    def guard(self, losses: _Losses, epoch: int) -> None:
        """Raise :class:`TrainingDiverged` at the first non-finite loss fetched so far."""
        bad = losses.check()
        if bad is not None:
            step = (epoch - 1) * self.n_batches + bad + 1
            raise self.diverged(epoch, bad + 1, step, losses.done)

    def train_epoch(
        self, state: TrainState, epoch: int, stop: StopRequest
    ) -> tuple[TrainState, _Losses, WaitClock, float]:
        """Train epoch ``epoch`` from where a mid-epoch checkpoint left it; a stop signal saves
        `last` after the current step and hands over to the scheduler (it does not return)."""
        tc, p = self.cfg.train, self.p
        train_x, train_y = self.data["train"]
        start, t0 = p.batch, time.perf_counter() - p.epoch_seconds
        losses = _Losses(p.epoch_losses)
        clock = WaitClock()
        n = self.n_batches
        with bar(
            enabled=self.show_progress, total=n, initial=start, desc=f"epoch {epoch}", leave=False
        ) as inner:
            stream = batches(
                train_x,
                train_y,
                tc.batch_size,
                seed=self.cfg.seed,
                epoch=epoch,
                transform=self.transform,
                rows=self.rows(tc.batch_size),
            )
            for i, b in enumerate(clock.wrap(stream)):
                if i < start:  # trained before a mid-epoch checkpoint
                    continue
                images, labels, mask = self.topology.shard(b.images, b.labels, b.mask)
                key = self.topology.replicate(b.key)
                state, loss = self.steps.train_step(state, images, labels, mask, key)
                losses.pending.append(loss)
                log_point = (i + 1) % tc.log_every == 0 or i + 1 == n
                if log_point:
                    self.guard(losses, epoch)
                    recent = float(np.mean(losses.done[-tc.log_every :]))
                    self.logger.log({"train/loss": recent, "epoch": epoch}, step=int(state.step))
                    inner.set_postfix(loss=f"{recent:.4f}")
                inner.update(1)
                if i + 1 < n and self.stopping(stop, log_point):
                    self.guard(losses, epoch)  # never checkpoint a non-finite update
                    p.batch, p.epoch_losses = i + 1, list(losses.done)
                    p.epoch_seconds = time.perf_counter() - t0
                    self.ckpts.save("last", int(state.step), state, p.to_json())
                    self.ckpts.prune(last=int(state.step), best=p.best_epoch or None)
                    self.logger.finish(1)  # flush W&B before the requeue ends its service
                    stop.hand_over(f"epoch {epoch}, batch {i + 1} of {n}")
        self.guard(losses, epoch)
        return state, losses, clock, t0

    def validate(
        self, state: TrainState, epoch: int, losses: _Losses
    ) -> tuple[float, float | None, dict[str, Any]]:
        """Validation loss, the objective's score (mean AUROC / AUC) and its extra metrics."""
        val_x, val_y = self.data["val"]
        val_probs, val_loss = predict(
            self.steps.eval_step,
            state,
            val_x,
            val_y,
            self.cfg.train.eval_batch_size,
            desc="val",
            progress=self.show_progress,
            shard=self.topology.shard,
            rows=self.rows(self.cfg.train.eval_batch_size),
            gather=self.topology.gather,
        )
        if not np.isfinite(val_loss):
            raise self.diverged(epoch, None, int(state.step), losses.done)
        val_auroc, _, extra = self.steps.objective.score(val_y, val_probs, self.cfg.task.labels)
        return val_loss, val_auroc, extra

    def improve(self, epoch: int, val_loss: float, val_auroc: float | None) -> bool:
        """Whether ``epoch`` is the new best (by train.best_by), and whether training ends."""
        tc, p = self.cfg.train, self.p
        if tc.best_by == BestBy.val_auc:  # an undefined AUC never improves on a defined one
            improved = p.best_epoch == 0 or (
                val_auroc is not None
                and (p.best_val_auc is None or val_auroc > p.best_val_auc + tc.min_delta)
            )
        else:
            improved = val_loss < p.best_val_loss - tc.min_delta
        if improved:
            p.best_val_loss, p.best_epoch, p.bad_epochs = val_loss, epoch, 0
            p.best_val_auc = val_auroc
        else:
            p.bad_epochs += 1
        if p.bad_epochs >= tc.patience:
            p.stopped = "early_stopping"
        elif epoch >= tc.max_epochs:
            p.stopped = "max_epochs"
        return improved

    def commit(self, state: TrainState, row: EpochRow, improved: bool) -> None:
        """Log the epoch, save `best` (if improved) then `last` (the commit), prune, and
        rewrite metrics.jsonl; why this order is crash-safe: ``qtl.train.checkpoint``."""
        p, epoch = self.p, row.epoch
        p.history.append(row.to_json())  # JSON in the checkpoint's metadata
        # before the commit: a crash after it would lose this row, one before it redoes
        # the epoch, whose row the logger then skips (it was logged at this step)
        self.logger.log(
            {
                "epoch": epoch,
                "train/epoch_loss": row.train_loss,
                "val/loss": row.val_loss,
                "val/best_loss": p.best_val_loss,
                "val/mean_auroc": row.val_mean_auroc,
            }
            | ({"val/acc": row.val_acc} if row.val_acc is not None else {}),
            step=int(state.step),
        )
        p.batch, p.epoch_losses, p.epoch_seconds = 0, [], 0.0
        if improved:
            faults.point("before_best_save")
            self.ckpts.save("best", epoch, state, p.to_json())  # counts once `last` names it
            faults.point("between_best_and_last")
        self.ckpts.save("last", int(state.step), state, p.to_json())  # the commit
        faults.point("after_last_save")
        self.ckpts.prune(last=int(state.step), best=p.best_epoch)
        self.files.write_metrics(p.history)


def fit(
    cfg: QtlConfig,
    steps: Steps,
    state: TrainState,
    progress_state: Progress,
    data: dict[str, tuple[Any, np.ndarray]],
    ckpts: Checkpoints,
    files: RunFiles,
    logger: Any,
    *,
    show_progress: bool,
) -> tuple[TrainState, Progress]:
    """Train until early stopping or ``max_epochs``; returns the last state and bookkeeping."""
    run = _Fit(cfg, steps, data, ckpts, files, logger, progress_state, show_progress)
    p, tc = run.p, cfg.train
    state = run.topology.replicate(state)
    epochs = bar(
        enabled=show_progress, total=tc.max_epochs, initial=p.epoch, desc="epochs", unit="ep"
    )
    with epochs, StopRequest() as stop:
        while p.stopped is None and p.epoch < tc.max_epochs:
            epoch = p.epoch + 1
            state, losses, clock, t0 = run.train_epoch(state, epoch, stop)
            val_loss, val_auroc, extra = run.validate(state, epoch, losses)
            seconds = time.perf_counter() - t0
            p.epoch = epoch
            p.train_seconds += seconds
            improved = run.improve(epoch, val_loss, val_auroc)
            row = EpochRow(
                epoch=epoch,
                step=int(state.step),
                train_loss=float(np.mean(losses.done)),
                val_loss=val_loss,
                val_mean_auroc=val_auroc,
                val_acc=extra.get("acc"),
                best=bool(improved),
                seconds=round(seconds, 3),
                data_wait_seconds=round(clock.seconds, 3),  # train loop blocked on the loader
            )
            run.commit(state, row, improved)
            epochs.set_postfix(
                train=f"{row.train_loss:.4f}", val=f"{val_loss:.4f}", best=p.best_epoch
            )
            epochs.update(1)
            if run.stopping(stop, True):  # arrived late in the epoch: `last` is this boundary
                logger.finish(1)
                stop.hand_over(f"end of epoch {epoch}")
    return state, p
