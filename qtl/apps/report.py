"""``mode=report``: tables, paired t-tests and figures of a sweep, from its run records."""

from __future__ import annotations

from pathlib import Path

from qtl.config import QtlConfig


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Path:
    from qtl.report import write_report

    return write_report(cfg.report, cfg.logger)
