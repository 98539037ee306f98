"""The run record's schema: the typed content of results.json, metrics.jsonl and failed.json.

:class:`qtl.record.files.RunFiles` is the one writer and the one reader of a run directory;
it writes these dataclasses and parses the files back into them. Every consumer (the
trainer, ``qtl.summary``, the sweep summary, the report, the search, the tests) goes through
it, so a renamed field cannot leave one of them reading stale keys.

    <run dir>/
      run_config.json        the run's identity and provenance (qtl.record.identity)
      metrics.jsonl          one EpochRow per finished epoch (the loop's source of truth)
      results.json           the finished run - Results (schema_version)
      failed.json            a run that stopped for good (diverged, ...) - Failure
      predictions_<split>.csv
      skipped_images.json
      checkpoints/{last,best}/<step>/   Orbax checkpoints (train state + loop bookkeeping)
      wandb/                 W&B offline run files (logger=wandb)

``results.json`` carries ``schema_version``; records written before versioning (no such key)
are version 1 and read the same, since versions 2 to 4 only added fields with defaults
(3: the MedMNIST study's ``study``, ``model``, ``dataset``, ``metrics``, ``teacher``, ``costs``;
4: ``label``, and ``task``, ``head``, ``auroc`` left empty by studies other than CXR;
5: ``data_source``, synthetic or real, inferred from the recorded config for older records).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qtl.utils.errors import QtlUserError

RESULTS_VERSION = 5
SYNTHETIC, REAL = "synthetic", "real"  # Results.data_source


class RecordError(QtlUserError, ValueError):
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
    """One line of metrics.jsonl: a finished epoch (written from the checkpointed history)."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_mean_auroc: float | None
    best: bool  # this epoch improved train.best_by (and was saved as `best`)
    seconds: float
    data_wait_seconds: float = 0.0  # time the loop waited for the loader
    val_acc: float | None = None  # MedMNIST runs: validation ACC (val_mean_auroc is its AUC)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpochRow:
        return cls(**_known(cls, data))


@dataclass
class Failure:
    """failed.json: why a run stopped for good; a rerun reports it instead of retraining."""

    reason: str  # short kind: non_finite | unknown
    message: str  # the researcher-facing explanation: what happened, which knobs to turn
    summary: str = ""  # one line for listings (sweep summary, report, qtl.summary)
    epoch: int | None = None
    batch: int | None = None  # None: it happened in validation
    step: int | None = None
    recent_losses: list[float] = field(default_factory=list)  # training losses before it
    knobs: dict[str, Any] = field(default_factory=dict)  # train.lr, train.backbone_lr, ...
    last_good_checkpoint: str = ""
    status: str = "failed"

    @property
    def headline(self) -> str:
        return (self.summary or self.message or self.reason).strip().splitlines()[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        known = _known(cls, data)
        known.setdefault("reason", "unknown")
        known.setdefault("message", "")
        return cls(**known)


@dataclass
class Results:
    """results.json: everything the report needs about one finished run."""

    run: str
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
    # the CXR study's: its task and head, and AUROC per label per split (None / empty for a
    # study whose runs are named and scored otherwise; records before version 4 of MedMNIST
    # runs hold the dataset, the model and the AUC there too)
    task: str | None = None
    head: str | None = None
    auroc: dict[str, SplitScores] = field(default_factory=dict)
    label: str = ""  # the study's run label (the folder before /seed<n>, the W&B group)
    split_sizes: dict[str, int] = field(default_factory=dict)
    train_label_counts: dict[str, int] = field(default_factory=dict)
    skipped_images: dict[str, list[str]] = field(default_factory=dict)
    wall_seconds: dict[str, float] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # what was loaded, and how
    study: str = "cxr"  # cxr (task/head/auroc) | medmnist (dataset/model/metrics)
    model: str | None = None  # medmnist: vit | qvit | resnet18
    dataset: str | None = None  # medmnist: the flag (retinamnist, ...)
    task_type: str | None = None  # medmnist: multi-class | binary | multi-label | ordinal
    distill: str = "none"  # none | joint | pretrain
    # medmnist: per evaluated split {"auc", "acc", "auc_undefined"} (MedMNIST's definitions)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)  # KD: the teacher run and its scores
    costs: dict[str, Any] = field(default_factory=dict)  # medmnist: per-image params and FLOPs
    # synthetic (qtl's built-in stand-in data) | real; None: written before qtl recorded it
    data_source: str | None = None
    # the circuit's shots, noise channels, trajectories, device model and its calibration
    # snapshot (qtl.quantum.noise.describe); empty: exact expectation values
    quantum_noise: dict[str, Any] = field(default_factory=dict)
    schema_version: int = RESULTS_VERSION

    @property
    def synthetic(self) -> bool:
        """Trained and tested on synthetic data: the recorded ``data_source``, else (records
        before version 5) the recorded config's data (data=synthetic; data=medmnist, whose
        files could only be qtl's synthetic ones then unless data.synthetic=false)."""
        if self.data_source is not None:
            return self.data_source == SYNTHETIC
        data = self.config.get("data", {}) if isinstance(self.config, dict) else {}
        name = str(data.get("name", ""))
        return name == SYNTHETIC or (name == "medmnist" and bool(data.get("synthetic", True)))

    def mean_auroc(self, split: str) -> float | None:
        """The split's headline AUC: the mean AUROC over labels, or the study's own AUC
        (``metrics[split]["auc"]``, MedMNIST's definition) for a study that records one."""
        block = self.auroc.get(split)
        if block is not None:
            return block.mean
        auc = self.metrics.get(split, {}).get("auc")
        return None if auc is None else float(auc)

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
            known["auroc"] = {s: SplitScores(**b) for s, b in data.get("auroc", {}).items()}
            known["schema_version"] = RESULTS_VERSION
            return cls(**known)
        except (KeyError, TypeError) as err:
            raise RecordError(f"{source}: not a qtl results record ({err}).") from err
