"""A small Hydra app for launcher tests: records what device and cores a job saw, and when.

Behaves like a qtl run towards the sweep summary: writes results.json when it finishes and
returns at once when that file is already there; ``fail=<job>`` makes that job raise;
``forge=<job>`` makes that job plant a pickled result file (that would create ``<its output
dir>/pwned`` if unpickled) where the launcher collects results, and die without one.
"""

import json
import os
import pickle
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if (out / "results.json").exists():
        return None
    start = time.time()
    if cfg.job == cfg.fail:
        raise ValueError(f"job {cfg.job} broke on purpose\nsecond line of the error")
    if cfg.job == cfg.forge:
        result = Path(hc.sweep.dir) / ".gpu_pool" / f"job{hc.job.num}.result.json"
        result.write_bytes(pickle.dumps(_Payload(str(out / "pwned"))))
        os._exit(0)
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
        "hydra_mode": repr(hc.mode),
        "job_num": hc.job.num,
        "job_id": hc.job.id,
        "sweep_dir": str(Path(hc.sweep.dir).absolute()),
        "start": start,
        "end": time.time(),
    }
    (out / "seen.json").write_text(json.dumps(seen))
    (out / "results.json").write_text(json.dumps({"epochs": 1, "best_epoch": 1, "auroc": {}}))
    return {"job": cfg.job, "cores": seen["cores"]}  # the sweep's return value, as JSON


class _Payload:
    """Unpickling this creates the file ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


if __name__ == "__main__":
    main()
