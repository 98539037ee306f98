"""Local run records: results.json, metrics.jsonl, predictions_<split>.csv.

These files alone are enough to rebuild every table and figure (no W&B needed). Writes are
atomic (temp file + rename) so a kill never leaves a half-written results.json.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunFiles:
    """The files of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results = self.dir / "results.json"
        self.metrics = self.dir / "metrics.jsonl"
        self.config = self.dir / "run_config.json"

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the checkpointed history (one line per finished epoch)."""
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, self.metrics)

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
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", *names, *(f"prob_{n}" for n in names)])
            for i, image_id in enumerate(ids):
                writer.writerow(
                    [image_id, *(int(v) for v in labels[i]), *(f"{p:.6f}" for p in probs[i])]
                )
        os.replace(tmp, path)
        return path

    def read_results(self) -> dict[str, Any] | None:
        if not self.results.exists():
            return None
        return json.loads(self.results.read_text())
