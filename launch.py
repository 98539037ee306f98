"""qtl entry point: compose conf/ with Hydra and run one job (``qtl.apps.run_job``).

python launch.py                                   # train the default config
python launch.py experiment=demo head=cdl          # a preset plus overrides
python launch.py debug=tiny head=dqc               # a seconds-long run to try things
python launch.py mode=describe task=cxr19 head=dqc # parameter table, no training
python launch.py -m task=cxr8,cxr14,cxr19 head=cdl,dqc seed='range(5)'   # the grid
python launch.py --cfg job                          # show the composed config

Exit status of a single run: 0 done, 2 bad input, 3 a save failed (disk full, read-only or
vanished folder; rerun after fixing it resumes), 4 training diverged (see failed.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jobs may share a GPU

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qtl.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qtl.apps import run_job

    hydra_cfg = HydraConfig.get()
    return run_job(
        cfg, Path(hydra_cfg.runtime.output_dir), multirun=hydra_cfg.mode == RunMode.MULTIRUN
    )


def _input_errors_in_one_line() -> None:
    """Bad input that Hydra meets before any job runs - an override of the wrong type, an
    unknown group option, a sweeper setting qtl refuses - as one line and exit 2, like the
    input errors of a job (``qtl.apps.one_line``). A job's own error in a multirun keeps
    Hydra's report (the sweep exits 1); HYDRA_FULL_ERROR=1 shows the whole traceback."""
    import sys

    import hydra._internal.utils as hydra_utils

    from qtl.apps import one_line, run_job

    report = hydra_utils.run_and_report

    def from_a_job(err: BaseException) -> bool:
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is run_job.__code__:
                return True
            tb = tb.tb_next
        return False

    def guarded(func):
        def call():
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


if __name__ == "__main__":
    _input_errors_in_one_line()
    main()
