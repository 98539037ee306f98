"""``mode=train``: one training run in its directory (``qtl.train.driver`` does the work).

The run's study is chosen here, once (:func:`qtl.studies.study_for`); it resolves what the
run starts from (``Study.start``: a backbone pretrained by qtl, a distillation teacher,
trained once and cached) so the layers below only load folders and arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig


def train_and_evaluate(cfg: QtlConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume), evaluate and record the run in ``run_dir``; safe to call again."""
    from qtl.backends import refuse_training
    from qtl.config import validate
    from qtl.studies import study_for
    from qtl.train import driver

    refuse_training(cfg)  # backend=torch|tf are for the framework benchmark, not for training
    study = study_for(cfg)
    # the study first: a field of the other study is named as such, before the shared checks
    # (which may otherwise ask to change it); both before a teacher is trained for a student
    # that cannot run
    study.validate(cfg)
    validate(cfg)
    return driver.train_and_evaluate(cfg, run_dir, study, **study.start(cfg))


def main(cfg: QtlConfig, run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None:
        raise ValueError("mode=train needs a run directory")
    return train_and_evaluate(cfg, run_dir)
