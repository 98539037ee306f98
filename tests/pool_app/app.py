"""A small Hydra app for launcher tests: records what device and cores a job saw, and when.

Behaves like a qtl run towards the sweep summary: writes results.json when it finishes and
returns at once when that file is already there; ``fail=<job>`` makes that job raise.
"""

import json
import os
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    if (out / "results.json").exists():
        return
    start = time.time()
    if cfg.job == cfg.fail:
        raise ValueError(f"job {cfg.job} broke on purpose\nsecond line of the error")
    time.sleep(cfg.sleep)
    seen = {
        "job": cfg.job,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "cores": sorted(os.sched_getaffinity(0)),
        "pid": os.getpid(),
        "start": start,
        "end": time.time(),
    }
    (out / "seen.json").write_text(json.dumps(seen))
    (out / "results.json").write_text(json.dumps({"epochs": 1, "best_epoch": 1, "auroc": {}}))


if __name__ == "__main__":
    main()
