"""The run record: what a run directory holds, with one writer and one reader.

Every file a training run leaves behind is named and typed here, and every consumer (the
trainer, ``qtl.summary``, the sweep summary, the report, the tests) reads it through
:class:`RunRecord`, so a renamed field cannot leave one of them reading stale keys.

    <run dir>/
      run_config.json        identity of the run (which config defines it) - RunConfig
      metrics.jsonl          one EpochRow per finished epoch (the loop's source of truth)
      results.json           the finished run - Results (schema_version)
      failed.json            a run that stopped for good (diverged, ...) - Failure
      predictions_<split>.csv
      skipped_images.json
      checkpoints/{last,best}/<step>/   Orbax checkpoints (train state + loop bookkeeping)
      wandb/                 W&B offline run files (logger=wandb)

``results.json`` carries ``schema_version``; records written before versioning (no such key)
are version 1 and read the same, since version 2 only added fields with defaults.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qtl.utils.files import atomic_write_text, write_json_atomic

RESULTS_VERSION = 2


class RecordError(ValueError):
    """A run record that qtl cannot read (another tool's file, a newer qtl's schema)."""


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class SplitScores:
    """Mean and per-label AUROC on one evaluated split (None: undefined, one class only)."""

    mean: float | None
    per_label: dict[str, float | None]


@dataclass
class EpochRow:
    """One line of metrics.jsonl: a finished epoch."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_mean_auroc: float | None
    best: bool  # this epoch improved the validation loss (and was saved as `best`)
    seconds: float
    data_wait_seconds: float = 0.0  # time the loop waited for the loader

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpochRow:
        return cls(**_known(cls, data))


@dataclass
class Failure:
    """Why a run stopped for good; a rerun reports it instead of silently retraining."""

    reason: str  # short kind: non_finite | ...
    message: str  # the researcher-facing explanation (what happened, which knobs)
    epoch: int | None = None
    batch: int | None = None
    time: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        return cls(**_known(cls, data))


@dataclass
class Results:
    """results.json: everything the report needs about one finished run."""

    run: str
    task: str
    head: str
    seed: int
    labels: list[str]
    fingerprint: str
    config: dict[str, Any]
    parameters: dict[str, int]
    epochs: int
    best_epoch: int
    stopped: str | None
    best_val_loss: float | None
    final_val_loss: float | None
    loss: dict[str, float]
    auroc: dict[str, SplitScores]
    split_sizes: dict[str, int] = field(default_factory=dict)
    train_label_counts: dict[str, int] = field(default_factory=dict)
    skipped_images: dict[str, list[str]] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # what was loaded, and how
    schema_version: int = RESULTS_VERSION

    def mean_auroc(self, split: str) -> float | None:
        block = self.auroc.get(split)
        return None if block is None else block.mean

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "results.json") -> Results:
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > RESULTS_VERSION:
            raise RecordError(
                f"{source}: schema_version {version!r}; this qtl reads up to "
                f"{RESULTS_VERSION}. Update qtl to read it."
            )
        try:
            known = _known(cls, data)
            known["auroc"] = {s: SplitScores(**b) for s, b in data["auroc"].items()}
            known["schema_version"] = RESULTS_VERSION
            return cls(**known)
        except (KeyError, TypeError) as err:
            raise RecordError(f"{source}: not a qtl results record ({err}).") from err


class RunRecord:
    """The files of one run directory: the only code that names, writes and parses them."""

    def __init__(self, run_dir: Path | str, *, create: bool = False):
        self.dir = Path(run_dir)
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)

    # -- where things live -----------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.dir / "run_config.json"

    @property
    def failure_path(self) -> Path:
        return self.dir / "failed.json"

    @property
    def skipped_path(self) -> Path:
        return self.dir / "skipped_images.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def predictions_path(self, split: str) -> Path:
        return self.dir / f"predictions_{split}.csv"

    # -- results.json ----------------------------------------------------------------------
    def write_results(self, results: Results) -> Path:
        return write_json_atomic(self.results_path, results.to_json())

    def read_results(self) -> Results | None:
        """The finished run, or None when there is none (or it cannot be parsed as JSON)."""
        data = _read_json(self.results_path)
        return None if data is None else Results.from_json(data, self.results_path)

    # -- metrics.jsonl ---------------------------------------------------------------------
    def write_metrics(self, history: Sequence[EpochRow | dict[str, Any]]) -> Path:
        """Rewrite metrics.jsonl from the checkpointed history (idempotent after a resume)."""
        rows = [asdict(r) if isinstance(r, EpochRow) else dict(r) for r in history]
        return atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def read_metrics(self) -> list[EpochRow]:
        """Finished epochs in order; a torn last line (a kill mid-write elsewhere) is dropped."""
        return list(_rows(self.metrics_path))

    # -- failed.json -----------------------------------------------------------------------
    def write_failure(self, failure: Failure) -> Path:
        return write_json_atomic(self.failure_path, asdict(failure))

    def read_failure(self) -> Failure | None:
        data = _read_json(self.failure_path)
        return None if data is None else Failure.from_json(data)

    # -- run_config.json -------------------------------------------------------------------
    def read_run_config(self) -> dict[str, Any] | None:
        return _read_json(self.config_path)

    def write_run_config(self, payload: dict[str, Any]) -> Path:
        return write_json_atomic(self.config_path, payload)

    # -- predictions -----------------------------------------------------------------------
    def write_predictions(
        self,
        split: str,
        ids: Sequence[str],
        labels: Any,
        probs: Any,
        names: Sequence[str],
    ) -> Path:
        """One row per image: id, true label per column, predicted probability per column."""
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(["id", *names, *(f"prob_{n}" for n in names)])
        for i, image_id in enumerate(ids):
            writer.writerow(
                [image_id, *(int(v) for v in labels[i]), *(f"{p:.6f}" for p in probs[i])]
            )
        return atomic_write_text(self.predictions_path(split), out.getvalue())

    # -- state -----------------------------------------------------------------------------
    def status(self) -> str:
        """finished | failed | started (checkpoints or epochs, no result) | new."""
        if self.results_path.exists():
            return "finished"
        if self.failure_path.exists():
            return "failed"
        last = self.checkpoints / "last"
        if self.metrics_path.exists() or (last.is_dir() and any(last.iterdir())):
            return "started"
        return "new"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable ({err}).") from err


def _rows(path: Path) -> Iterator[EpochRow]:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield EpochRow.from_json(json.loads(line))
        except (ValueError, TypeError):
            return
