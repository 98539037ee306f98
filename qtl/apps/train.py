"""``mode=train``: one training run in its directory (``qtl.train.driver`` does the work).

The application resolves what the run starts from - ``backbone.pretrained=synthetic`` is
trained here once (``qtl.apps.pretrain``), and so is a distillation teacher
(``qtl.apps.teacher``) - so the layers below only load folders and arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig


def train_and_evaluate(cfg: QtlConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume), evaluate and record the run in ``run_dir``; safe to call again."""
    from qtl.apps.pretrain import resolve_weights
    from qtl.apps.teacher import resolve_teacher
    from qtl.backends import refuse_training
    from qtl.config import DataName, validate
    from qtl.train import driver

    refuse_training(cfg)  # backend=torch|tf are for the framework benchmark, not for training
    validate(cfg)  # before a teacher is trained for a student that cannot run
    if cfg.data.name == DataName.medmnist:
        return driver.train_and_evaluate(cfg, run_dir, teacher=resolve_teacher(cfg))
    return driver.train_and_evaluate(cfg, run_dir, weights=resolve_weights(cfg))


def main(cfg: QtlConfig, run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None:
        raise ValueError("mode=train needs a run directory")
    return train_and_evaluate(cfg, run_dir)
