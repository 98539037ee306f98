"""What a reader hands to the rest of qtl: per split, image paths and a label matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtl.utils.errors import QtlUserError


class DataError(QtlUserError, ValueError):
    """Bad or missing data; the message names the file/field and what was expected."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset, in the task's label order."""

    name: str  # train | val | test | external
    ids: tuple[str, ...]  # image ids as in the label file (NIH `id`, MIMIC `dicom_id`)
    paths: tuple[Path, ...]  # image file per id
    labels: np.ndarray  # (N, L) float32 multi-hot, columns = label_names
    label_names: tuple[str, ...]
    source: Path  # label file the split was read from

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.paths) != n or self.labels.shape != (n, len(self.label_names)):
            raise ValueError(f"split {self.name}: ids/paths/labels disagree in length")

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, limit: int | None) -> Split:
        """The first ``limit`` records (all when None) — for smoke runs on real data."""
        if limit is None or limit >= len(self):
            return self
        return Split(
            self.name,
            self.ids[:limit],
            self.paths[:limit],
            self.labels[:limit],
            self.label_names,
            self.source,
        )
