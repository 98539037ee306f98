"""``mode=bench_step``: the whole train step (backbone + head + optimiser) per head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig, validate


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    from qtl.bench.step import bench_step

    validate(cfg)
    return bench_step(cfg)
