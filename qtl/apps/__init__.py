"""One small application per ``mode``; ``launch.py`` only composes the config and calls
:func:`run_job`.

Each application is a module with ``main(cfg, run_dir)``: ``train`` (train, evaluate,
record), ``describe`` (parameter table), ``cache`` (fill the image cache), ``report`` (tables,
tests and figures of a sweep) and the benchmarks. Training runs own their directory; every
other mode gets a folder of its own (see ``qtl.config.run_dir``), so nothing but training
writes into a run.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from qtl.config import ConfigError, Mode, QtlConfig, to_schema

APPS: dict[Mode, str] = {
    Mode.train: "qtl.apps.train",
    Mode.describe: "qtl.apps.describe",
    Mode.cache: "qtl.apps.cache",
    Mode.report: "qtl.apps.report",
    Mode.bench_circuit: "qtl.apps.bench_circuit",
    Mode.bench_step: "qtl.apps.bench_step",
    Mode.bench_data: "qtl.apps.bench_data",
}


def dispatch(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    """Run the application of ``cfg.mode`` (importing only what that mode needs)."""
    return importlib.import_module(APPS[cfg.mode]).main(cfg, run_dir)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are a researcher's to fix: printed as one message, no traceback."""
    from qtl.data.records import DataError
    from qtl.train.checkpoint import CheckpointError

    return (ConfigError, DataError, CheckpointError)


def run_job(raw: Any, run_dir: Path, *, multirun: bool) -> float | None:
    """What ``launch.py`` does for one job: validate, set up the process, dispatch.

    Returns the sweep objective of a finished training run for Hydra's sweepers (a
    validation number, ``search.objective``: see ``qtl.sweep.objective``). A user error exits
    with status 2; in a multirun it is re-raised so Hydra marks that job failed and still runs
    the others.
    """
    from qtl.runtime import configure_jax
    from qtl.utils import paths

    try:
        cfg = to_schema(raw)
        paths.export(cfg.paths)
        configure_jax(paths.jax_cache(cfg.paths))
        result = dispatch(cfg, run_dir)
    except _user_errors() as err:
        print(f"\nqtl: {type(err).__name__}: {err}\n", file=sys.stderr)
        if multirun:
            raise
        sys.exit(2)
    from qtl.sweep.objective import job_return

    return job_return(result, cfg.search)
