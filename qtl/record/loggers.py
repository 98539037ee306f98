"""Experiment loggers: nothing, or Weights & Biases (offline run files when no API key).

One W&B run per job, even inside a Hydra multirun; the run id is kept in the run directory
so a resumed job continues the same W&B run; ``finish`` is always called by the runner.
A job that crashed redoes the work after its last checkpoint, and logs it again: the run's
W&B files say up to which step each metric was logged, so it reaches W&B once per step.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from qtl.config import LoggerName, QtlConfig, WandbMode

STEP_METRIC = "epoch"  # logged with every row; the x axis of the per-epoch metrics


class NullLogger:
    """Logs nothing; the local files are written regardless."""

    run_id: str | None = None

    def log(self, data: dict[str, Any], step: int) -> None:
        pass

    def summary(self, data: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _wandb_mode(mode: WandbMode) -> str:
    if mode != WandbMode.auto:
        return mode.value
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    return "online" if has_key else "offline"


class WandbLogger:
    """A W&B run in ``<run_dir>/wandb``; resumes the run whose id is in ``wandb_run_id``."""

    def __init__(
        self,
        cfg: QtlConfig,
        run_dir: Path,
        config: dict[str, Any],
        run_name: str,
        group: str,
        tags: list[str],
    ):
        import wandb

        from qtl.record.wandb_file import last_steps

        wcfg = cfg.logger.wandb
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run_id = run_id
        # per metric, the last step an earlier attempt of this job logged (see the docstring)
        self._logged = last_steps(Path(run_dir) / "wandb")
        self._run = wandb.init(
            project=wcfg.project,
            entity=wcfg.entity,
            group=group,
            name=run_name,
            tags=[*tags, *wcfg.tags],
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=_wandb_mode(wcfg.mode),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._run.define_metric(STEP_METRIC)
        for key in ("val/*", "train/epoch_loss"):
            self._run.define_metric(key, step_metric=STEP_METRIC)

    # W&B is a copy of the local records: a W&B failure (its service process killed, e.g. by
    # SLURM's signals around a requeue) is reported once and never stops or fails the run.
    _broken: bool = False
    _finished: bool = False

    def _guard(self, what: str, call: Any) -> None:
        if self._broken:
            return
        try:
            call()
        except Exception as err:  # any W&B failure: keep training
            self._broken = True
            print(f"[qtl] W&B {what} failed ({err!r}); local records continue", flush=True)

    def log(self, data: dict[str, Any], step: int) -> None:
        """Log the metrics not yet logged at ``step`` (a redone step's are already in W&B)."""
        fresh = {
            k: v for k, v in data.items() if k != STEP_METRIC and self._logged.get(k, -1) < step
        }
        if fresh:
            if STEP_METRIC in data:  # the x axis goes with every row
                fresh[STEP_METRIC] = data[STEP_METRIC]
            self._guard("log", lambda: self._run.log(fresh, step=step))

    def summary(self, data: dict[str, Any]) -> None:
        self._guard("summary", lambda: self._run.summary.update(data))

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (once; a stopped run is closed before the scheduler requeues it)."""
        if not self._finished:
            self._finished = True
            self._guard("finish", lambda: self._run.finish(exit_code=exit_code))


def make_logger(
    cfg: QtlConfig,
    run_dir: Path,
    config: dict[str, Any],
    run_name: str,
    group: str,
    tags: list[str],
) -> NullLogger | WandbLogger:
    """``logger=``'s logger; ``group`` and ``tags`` come from the run's study (its run label)."""
    if cfg.logger.name == LoggerName.wandb:
        return WandbLogger(cfg, run_dir, config, run_name, group, tags)
    return NullLogger()
