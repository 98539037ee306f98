"""``mode=describe``: the model's parameters per component, without allocating weights
(the run's study prints its table: ``Study.describe``)."""

from __future__ import annotations

from pathlib import Path

from qtl.config import QtlConfig, validate


def main(cfg: QtlConfig, run_dir: Path | None = None) -> list[tuple[str, int]]:
    from qtl.studies import study_for

    study = study_for(cfg)
    study.validate(cfg)  # the other study's fields named as such, before the shared checks
    validate(cfg)
    return study.describe(cfg)
