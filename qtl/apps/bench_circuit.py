"""``mode=bench_circuit``: value_and_grad of the dressed head per simulator and qubit count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    from qtl.bench.circuit import bench_circuit

    return bench_circuit(cfg.bench_circuit, cfg.head)
