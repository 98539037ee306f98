"""qtl entry point: compose conf/ with Hydra, validate, and run one job.

python launch.py                                   # train the default config
python launch.py experiment=demo head=cdl          # a preset plus overrides
python launch.py mode=describe task=cxr19 head=dqc # parameter table, no training
python launch.py -m task=cxr8,cxr14,cxr19 head=cdl,dqc seed='range(5)'   # the grid
python launch.py --cfg job                          # show the composed config
"""

from __future__ import annotations

import os
import sys

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

    from qtl.config import ConfigError, to_schema
    from qtl.data.records import DataError
    from qtl.run import run
    from qtl.runtime import configure_jax
    from qtl.train.checkpoint import CheckpointError

    configure_jax()
    try:
        typed = to_schema(cfg)
        result = run(typed, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"\nqtl: {type(err).__name__}: {err}\n", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and still runs the sweep's other jobs
        sys.exit(2)
    from qtl.sweep.objective import job_return

    return job_return(result, typed.search)  # a training run: its validation objective


if __name__ == "__main__":
    main()
