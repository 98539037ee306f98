"""``mode=train``: train (or resume) one run in its directory, evaluate it, write its record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig


def main(cfg: QtlConfig, run_dir: Path | None) -> dict[str, Any]:
    from qtl.run import train_and_evaluate

    if run_dir is None:
        raise ValueError("mode=train needs a run directory")
    return train_and_evaluate(cfg, run_dir)
