"""``mode=bench_features``: head epoch times on NIH-sized cached features (CDL and DQC-fast),
float16 against float32 storage, and the ResNet-50 feature-extraction rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig, validate


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    from qtl.bench.features import bench_features

    validate(cfg)
    return bench_features(cfg, run_dir)
