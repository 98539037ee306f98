"""qtl entry point: compose conf/ with Hydra, validate, and run one job.

python launch.py                                   # train the default config
python launch.py experiment=demo head=cdl          # a preset plus overrides
python launch.py mode=describe task=cxr19 head=dqc # parameter table, no training
python launch.py -m task=cxr8,cxr14,cxr19 head=cdl,dqc seed='range(5)'   # the grid
python launch.py --cfg job                          # show the composed config

Exit status of a single run: 0 done, 2 bad input, 3 a save failed (disk full, read-only or
vanished folder; rerun after fixing it resumes), 4 training diverged (see failed.json).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jobs may share a GPU

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from qtl.config import register_configs  # noqa: E402

register_configs()

# Exit status of a single run that stopped on a known cause (a sweep exits 1 instead):
# 2 bad input (fix the command, data or config), 3 a checkpoint or record could not be
# written (fix the disk, rerun to resume), 4 training diverged (recorded in failed.json).
EXIT_SAVE, EXIT_DIVERGED, EXIT_INPUT = 3, 4, 2


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qtl.config import ConfigError, to_schema
    from qtl.data.records import DataError
    from qtl.record.files import SaveError
    from qtl.run import run
    from qtl.runtime import configure_jax
    from qtl.train.checkpoint import CheckpointError
    from qtl.train.preempt import TrainingDiverged

    configure_jax()
    try:
        typed = to_schema(cfg)
        result = run(typed, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, CheckpointError, SaveError, TrainingDiverged) as err:
        print(f"\nqtl: {type(err).__name__}: {err}\n", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and still runs the sweep's other jobs
        if isinstance(err, SaveError):
            sys.exit(EXIT_SAVE)
        sys.exit(EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_INPUT)
    if isinstance(result, dict):  # a finished training run: the sweep's objective
        return (result.get("auroc", {}).get("test") or {}).get("mean")
    return None


if __name__ == "__main__":
    main()
