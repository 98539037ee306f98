"""The run record's files - results.json, metrics.jsonl, predictions_<split>.csv, failed.json -
written and read here only (their content is typed in :mod:`qtl.record.schema`).

These files alone are enough to rebuild every table and figure (no W&B needed). Each is
written whole to a temp file, flushed to disk and renamed over the old one, so a kill or a
power loss leaves the old or the new file, never a torn one; and each is rewritten from the
checkpointed state, so a rerun after a crash writes the same files again.

``failed.json`` records a run that cannot succeed by being rerun as it is (training
diverged): the summaries and the report list it as failed with its reason, and a rerun
refuses with that reason instead of training into the same failure again.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qtl.record.schema import EpochRow, Failure, RecordError, Results
from qtl.utils.files import SaveError, atomic_write_text, describe_os_error

__all__ = [
    "EpochRow",
    "Failure",
    "RecordError",
    "Results",
    "RunFiles",
    "SaveError",
    "describe_os_error",
    "read_failure",
]

FAILED = "failed.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step, durably; raises SaveError naming the file."""
    atomic_write_text(path, text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunFiles:
    """The files of one run directory: the one writer and the one reader of each of them."""

    def __init__(self, run_dir: Path, *, create: bool = True):
        self.dir = Path(run_dir)
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.results = self.dir / "results.json"
        self.metrics = self.dir / "metrics.jsonl"
        self.config = self.dir / "run_config.json"
        self.failed = self.dir / FAILED
        self.skipped = self.dir / "skipped_images.json"
        self.checkpoints = self.dir / "checkpoints"

    def predictions(self, split: str) -> Path:
        return self.dir / f"predictions_{split}.csv"

    # -- results.json ----------------------------------------------------------------------
    def write_results(self, results: Results) -> None:
        write_json_atomic(self.results, results.to_json())

    def read_results(self) -> Results | None:
        """The finished run, or None; a file that is not a qtl record is a RecordError."""
        data = _read_json(self.results)
        return None if data is None else Results.from_json(data, self.results)

    # -- metrics.jsonl ---------------------------------------------------------------------
    def write_metrics(self, history: Sequence[dict[str, Any] | EpochRow]) -> None:
        """Rewrite metrics.jsonl from the checkpointed history (one line per finished epoch)."""
        rows = [r.to_json() if isinstance(r, EpochRow) else dict(r) for r in history]
        write_text_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in rows))

    def read_metrics(self) -> list[EpochRow]:
        """Finished epochs in order; a torn last line is dropped (a kill mid-copy elsewhere)."""
        rows: list[EpochRow] = []
        if self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    rows.append(EpochRow.from_json(json.loads(line)))
                except (ValueError, TypeError):
                    break
        return rows

    # -- predictions_<split>.csv -----------------------------------------------------------
    def write_predictions(
        self,
        split: str,
        ids: Sequence[str],
        labels: np.ndarray,
        probs: np.ndarray,
        names: Sequence[str],
        prob_names: Sequence[str] | None = None,
    ) -> Path:
        """One row per image: id, true label per column, predicted probability per column
        (``prob_names``: the score columns when they differ from the label columns, e.g. one
        class index and a probability per class)."""
        path = self.predictions(split)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", *names, *(f"prob_{n}" for n in (prob_names or names))])
        for i, image_id in enumerate(ids):
            writer.writerow(
                [image_id, *(int(v) for v in labels[i]), *(f"{p:.6f}" for p in probs[i])]
            )
        write_text_atomic(path, out.getvalue())
        return path

    # -- failed.json -----------------------------------------------------------------------
    def write_failure(self, failure: Failure) -> None:
        write_json_atomic(self.failed, failure.to_json())

    def read_failure(self) -> Failure | None:
        """The run's failed.json, or None; an unreadable one still counts as a failure."""
        if not self.failed.exists():
            return None
        try:
            data = json.loads(self.failed.read_text())
        except (OSError, ValueError) as err:
            return Failure(reason="unknown", message=f"{self.failed}: unreadable ({err})")
        if not isinstance(data, dict):
            return Failure(reason="unknown", message=f"{self.failed}: not a failure record")
        return Failure.from_json(data)

    # -- run_config.json (written by qtl.record.identity) -----------------------------------
    def read_run_config(self) -> dict[str, Any] | None:
        """The run's identity record, or None when it is missing or unreadable."""
        try:
            data = _read_json(self.config)
        except RecordError:
            return None
        return data if isinstance(data, dict) else None

    # -- the run's state -------------------------------------------------------------------
    def status(self) -> str:
        """finished | failed | started (checkpoints or finished epochs) | new."""
        if self.results.exists():
            return "finished"
        if self.failed.exists():
            return "failed"
        last = self.checkpoints / "last"
        if (last.is_dir() and any(p.name.isdigit() for p in last.iterdir())) or (
            self.metrics.exists()
        ):
            return "started"
        return "new"


class PeerFiles(RunFiles):
    """A run directory as the other processes of a multi-process run see it: they read it
    like process 0 but write nothing (process 0 writes every record; qtl.utils.distributed)."""

    def write_results(self, results: Results) -> None:
        pass

    def write_metrics(self, history: Sequence[dict[str, Any] | EpochRow]) -> None:
        pass

    def write_predictions(self, split: str, *args: Any, **kwargs: Any) -> Path:
        return self.predictions(split)

    def write_failure(self, failure: Failure) -> None:
        pass


def read_failure(run_dir: Path) -> Failure | None:
    return RunFiles(run_dir, create=False).read_failure()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable ({err}).") from err
