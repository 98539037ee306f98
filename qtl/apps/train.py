"""``mode=train``: one training run in its directory (``qtl.train.driver`` does the work).

The application resolves what the run starts from - ``backbone.pretrained=synthetic`` is
trained here once (``qtl.apps.pretrain``) - so the layers below only load folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig


def train_and_evaluate(cfg: QtlConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume), evaluate and record the run in ``run_dir``; safe to call again."""
    from qtl.apps.pretrain import resolve_weights
    from qtl.backends import refuse_training
    from qtl.train import driver

    refuse_training(cfg)  # backend=torch|tf are for the framework benchmark, not for training
    return driver.train_and_evaluate(cfg, run_dir, weights=resolve_weights(cfg))


def main(cfg: QtlConfig, run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None:
        raise ValueError("mode=train needs a run directory")
    return train_and_evaluate(cfg, run_dir)
