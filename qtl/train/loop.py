"""The epoch loop: train, validate, checkpoint, stop early — resumable at every epoch boundary.

Order inside an epoch: train over all batches -> validation loss -> save `last` (and `best`)
-> rewrite metrics.jsonl from the checkpointed history. A kill anywhere loses at most the
epoch in progress; the rerun restores `last` and continues with the next epoch, with the
same batches it would have seen (the stream is a function of seed and epoch only).

A scheduler's stop signal (SLURM preemption or time limit, see ``qtl.train.preempt``) loses
nothing: after the current step, `last` is saved with the position inside the epoch and the
losses so far; the resumed run skips the batches already trained and finishes the epoch
exactly as an uninterrupted run would. `last` is keyed by the global step, so a mid-epoch
save and the following epoch-end save never collide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from qtl.config import QtlConfig
from qtl.data.augment import augment_host, placement
from qtl.data.loader import WaitClock, batches, num_batches
from qtl.evaluate.metrics import mean_auroc, per_label_auroc
from qtl.evaluate.predict import predict
from qtl.progress import bar
from qtl.record.files import RunFiles
from qtl.train.checkpoint import Checkpoints
from qtl.train.preempt import StopRequest
from qtl.train.step import Steps, TrainState


@dataclass
class Progress:
    """Loop bookkeeping stored with every checkpoint."""

    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_val_loss: float = float("inf")
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
    tc = cfg.train
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    p = progress_state
    n_batches = num_batches(len(train_x), tc.batch_size)
    transform = None
    if placement(cfg.data) == "host":
        pool = getattr(train_x, "pool", None)  # the image cache's reader threads, when cached
        transform = partial(
            augment_host,
            hflip_p=cfg.data.hflip_p,
            max_rotation_deg=cfg.data.max_rotation_deg,
            pool=pool,
        )
    epochs = bar(
        enabled=show_progress, total=tc.max_epochs, initial=p.epoch, desc="epochs", unit="ep"
    )
    with epochs, StopRequest() as stop:
        while p.stopped is None and p.epoch < tc.max_epochs:
            epoch = p.epoch + 1
            start, t0 = p.batch, time.perf_counter() - p.epoch_seconds
            losses: list[Any] = list(p.epoch_losses)
            clock = WaitClock()
            with bar(
                enabled=show_progress,
                total=n_batches,
                initial=start,
                desc=f"epoch {epoch}",
                leave=False,
            ) as inner:
                stream = batches(
                    train_x, train_y, tc.batch_size, seed=cfg.seed, epoch=epoch, transform=transform
                )
                for i, b in enumerate(clock.wrap(stream)):
                    if i < start:  # trained before a mid-epoch checkpoint
                        continue
                    state, loss = steps.train_step(state, b.images, b.labels, b.mask, b.key)
                    losses.append(loss)
                    if (i + 1) % tc.log_every == 0 or i + 1 == n_batches:
                        recent = float(np.mean([float(x) for x in losses[-tc.log_every :]]))
                        logger.log({"train/loss": recent, "epoch": epoch}, step=int(state.step))
                        inner.set_postfix(loss=f"{recent:.4f}")
                    inner.update(1)
                    if stop.signum is not None and i + 1 < n_batches:
                        p.batch, p.epoch_losses = i + 1, [float(x) for x in losses]
                        p.epoch_seconds = time.perf_counter() - t0
                        ckpts.save("last", int(state.step), state, p.to_json())
                        logger.finish(1)  # flush W&B before the requeue ends its service
                        stop.hand_over(f"epoch {epoch}, batch {i + 1} of {n_batches}")
            train_loss = float(np.mean([float(x) for x in losses]))
            val_probs, val_loss = predict(
                steps.eval_step,
                state,
                val_x,
                val_y,
                tc.eval_batch_size,
                desc="val",
                progress=show_progress,
            )
            val_auroc = mean_auroc(per_label_auroc(val_y, val_probs, cfg.task.labels))
            seconds = time.perf_counter() - t0
            p.epoch = epoch
            p.train_seconds += seconds
            improved = val_loss < p.best_val_loss - tc.min_delta
            if improved:
                p.best_val_loss, p.best_epoch, p.bad_epochs = val_loss, epoch, 0
            else:
                p.bad_epochs += 1
            if p.bad_epochs >= tc.patience:
                p.stopped = "early_stopping"
            elif epoch >= tc.max_epochs:
                p.stopped = "max_epochs"
            row = {
                "epoch": epoch,
                "step": int(state.step),
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_mean_auroc": val_auroc,
                "best": improved,
                "seconds": round(seconds, 3),
                "data_wait_seconds": round(clock.seconds, 3),  # train loop blocked on the loader
            }
            p.history.append(row)
            p.batch, p.epoch_losses, p.epoch_seconds = 0, [], 0.0
            if improved:
                ckpts.save("best", epoch, state, p.to_json())
            ckpts.save("last", int(state.step), state, p.to_json())
            files.write_metrics(p.history)
            logger.log(
                {
                    "epoch": epoch,
                    "train/epoch_loss": train_loss,
                    "val/loss": val_loss,
                    "val/best_loss": p.best_val_loss,
                    "val/mean_auroc": val_auroc,
                },
                step=int(state.step),
            )
            epochs.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=p.best_epoch)
            epochs.update(1)
            if stop.signum is not None:  # arrived late in the epoch: `last` is this boundary
                logger.finish(1)
                stop.hand_over(f"end of epoch {epoch}")
    return state, p
