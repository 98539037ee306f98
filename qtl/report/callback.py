"""Hydra callback: write the report into the sweep folder when a multirun ends.

Registered in ``conf/config.yaml`` (``hydra.callbacks.report``); ``report.auto=false``
skips it. It never changes a sweep's outcome: any error while reporting is printed, not
raised, and a sweep with a failed job still exits non-zero. Hydra's basic sweeper raises
on a failed job before ``on_multirun_end``, so the report is then written at interpreter
exit instead. Each failed job also gets ``job_error.txt`` in its directory, which the
report quotes.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

ERROR_FILE = "job_error.txt"


class ReportCallback(Callback):
    """``on_multirun_end`` (or exit, after a failed job): ``write_report`` on the sweep."""

    def __init__(self) -> None:
        self._config: DictConfig | None = None
        self._done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._config = config
        atexit.register(self._at_exit)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or job_return.hydra_cfg is None:
            return
        try:
            job_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
            err = job_return._return_value
            (job_dir / ERROR_FILE).write_text(f"{type(err).__name__}: {err}\n")
        except Exception:  # noqa: BLE001 - a note for the report must not fail the sweep
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config)

    def _at_exit(self) -> None:
        if self._config is not None:
            self._write(self._config)

    def _write(self, config: DictConfig) -> None:
        if self._done:
            return
        self._done = True
        try:
            if str(config.get("mode")) != "train" or not config.report.auto:
                return
            from qtl.config import LoggerConfig, ReportConfig
            from qtl.report import write_report

            report = OmegaConf.merge(OmegaConf.structured(ReportConfig), config.report)
            report.sweep = str(config.hydra.sweep.dir)
            logger = OmegaConf.merge(OmegaConf.structured(LoggerConfig), config.logger)
            write_report(OmegaConf.to_object(report), OmegaConf.to_object(logger))  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - reporting never fails or masks the sweep
            print(f"[qtl] sweep report not written: {type(err).__name__}: {err}", file=sys.stderr)
