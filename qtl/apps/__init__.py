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

from qtl.config import Mode, QtlConfig, to_schema
from qtl.utils import errors

APPS: dict[Mode, str] = {
    Mode.train: "qtl.apps.train",
    Mode.describe: "qtl.apps.describe",
    Mode.cache: "qtl.apps.cache",
    Mode.report: "qtl.apps.report",
    Mode.bench_circuit: "qtl.apps.bench_circuit",
    Mode.bench_step: "qtl.apps.bench_step",
    Mode.bench_data: "qtl.apps.bench_data",
    Mode.features: "qtl.apps.features",
    Mode.bench_features: "qtl.apps.bench_features",
    Mode.predict: "qtl.apps.predict",
    Mode.export: "qtl.apps.export",
    Mode.robustness: "qtl.apps.robustness",
}


def dispatch(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    """Run the application of ``cfg.mode`` (importing only what that mode needs)."""
    from qtl.backends import refuse_outside_bench

    refuse_outside_bench(cfg)  # only mode=bench_step has PyTorch and TensorFlow models
    return importlib.import_module(APPS[cfg.mode]).main(cfg, run_dir)


# Exit status of a single run that stopped on a known cause (a sweep exits 1 instead): each
# error class names its own (qtl.utils.errors): 2 bad input (fix the command, data or
# config), 3 a checkpoint or record could not be written (fix the disk, rerun to resume), 4
# training diverged (recorded in failed.json).
EXIT_INPUT, EXIT_SAVE, EXIT_DIVERGED = errors.EXIT_INPUT, errors.EXIT_SAVE, errors.EXIT_DIVERGED


def one_line(err: BaseException) -> tuple[int, str] | None:
    """The exit status and the one-line message of a known error: a :class:`QtlError`, or
    Hydra's / OmegaConf's for a command whose config does not compose (a value of the wrong
    type, an unknown option: bad input, exit 2). None for anything else (a bug: traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, errors.QtlError):
        code = err.exit_code
    elif isinstance(err, HydraException | OmegaConfBaseException):
        code = EXIT_INPUT
    else:
        return None
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    text = " ".join(f"{err} {cause or ''}".split())  # OmegaConf's messages span lines
    return code, f"qtl: {type(err).__name__}: {text}"


def run_job(raw: Any, run_dir: Path, *, multirun: bool) -> float | None:
    """What ``launch.py`` does for one job: validate, set up the process, dispatch.

    Exit status of a single run: 0 done, 2 bad input, 3 a save failed (disk full, read-only
    or vanished folder; rerun after fixing it resumes), 4 training diverged (see failed.json).
    Returns the sweep objective of a finished training run for Hydra's sweepers (a
    validation number, ``search.objective``: see ``qtl.sweep.objective``). In a multirun a
    known error is re-raised, so Hydra marks that job failed and still runs the others.
    """
    from qtl.runtime import configure_jax
    from qtl.utils import paths

    try:
        cfg = to_schema(raw)
        paths.export(cfg.paths)
        configure_jax(paths.jax_cache(cfg.paths))
        if cfg.mode == Mode.train:  # train.processes > 1: join the run's other processes
            from qtl.utils import distributed

            distributed.start(cfg.train)
        result = dispatch(cfg, run_dir)
    except errors.QtlError as err:
        code, line = one_line(err) or (1, str(err))
        print(f"\n{line}\n", file=sys.stderr, flush=True)
        if multirun:
            raise  # Hydra records this job as failed and still runs the sweep's other jobs
        sys.exit(code)
    except Exception as err:
        from qtl.utils import distributed

        distributed.abandon(err)  # several processes: a lost peer ends this one at once
        raise
    if cfg.mode != Mode.train:
        return None
    from qtl.sweep.objective import job_return

    return job_return(result, cfg.search)


def input_errors_in_one_line() -> None:
    """Bad input that Hydra meets before any job runs - an override of the wrong type, an
    unknown group option, a sweeper setting qtl refuses - as one line and exit 2, like the
    input errors of a job (:func:`one_line`), by wrapping Hydra's ``run_and_report`` (called
    by ``launch.py`` before ``hydra.main`` runs). A job's own error in a multirun keeps
    Hydra's report (the sweep exits 1); HYDRA_FULL_ERROR=1 shows the whole traceback."""
    import os

    import hydra._internal.utils as hydra_utils

    report = hydra_utils.run_and_report

    def from_a_job(err: BaseException) -> bool:
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is run_job.__code__:
                return True
            tb = tb.tb_next
        return False

    def guarded(func: Any) -> Any:
        def call() -> Any:
            try:
                return func()
            except Exception as err:
                known = one_line(err)
                if known is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or from_a_job(err):
                    raise
                print(f"\n{known[1]}\n", file=sys.stderr, flush=True)
                sys.exit(known[0])

        return report(call)

    hydra_utils.run_and_report = guarded
