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

from qtl.studies import register_configs  # noqa: E402

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


if __name__ == "__main__":
    main()
