"""Local run records: results.json, metrics.jsonl, predictions_<split>.csv, failed.json.

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

from qtl.utils.files import SaveError, atomic_write_text, describe_os_error

__all__ = ["SaveError", "describe_os_error", "RunFiles", "read_failure", "write_json_atomic"]

FAILED = "failed.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step, durably; raises SaveError naming the file."""
    atomic_write_text(path, text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunFiles:
    """The files of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results = self.dir / "results.json"
        self.metrics = self.dir / "metrics.jsonl"
        self.config = self.dir / "run_config.json"
        self.failed = self.dir / FAILED

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the checkpointed history (one line per finished epoch)."""
        write_text_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in history))

    def write_predictions(
        self,
        split: str,
        ids: Sequence[str],
        labels: np.ndarray,
        probs: np.ndarray,
        names: Sequence[str],
    ) -> Path:
        """One row per image: id, true label per column, predicted probability per column."""
        path = self.dir / f"predictions_{split}.csv"
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", *names, *(f"prob_{n}" for n in names)])
        for i, image_id in enumerate(ids):
            writer.writerow(
                [image_id, *(int(v) for v in labels[i]), *(f"{p:.6f}" for p in probs[i])]
            )
        write_text_atomic(path, out.getvalue())
        return path

    def read_results(self) -> dict[str, Any] | None:
        if not self.results.exists():
            return None
        return json.loads(self.results.read_text())

    def write_failure(self, record: dict[str, Any]) -> None:
        """failed.json: ``{"status": "failed", "reason": ..., "message": ..., ...}``."""
        write_json_atomic(self.failed, {"status": "failed", **record})

    def read_failure(self) -> dict[str, Any] | None:
        return read_failure(self.dir)


def read_failure(run_dir: Path) -> dict[str, Any] | None:
    """The run's failed.json, or None; an unreadable one still counts as a failure."""
    path = Path(run_dir) / FAILED
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"status": "failed", "reason": "unknown", "message": f"{path}: unreadable ({err})"}
    return record if isinstance(record, dict) else {"status": "failed", "reason": "unknown"}
