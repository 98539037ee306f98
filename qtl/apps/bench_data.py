"""``mode=bench_data``: the data path's cold, warm and augmented images per second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig, validate


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    from qtl.data.bench import bench_data

    validate(cfg)
    return bench_data(cfg, run_dir)
