"""One gpu_pool job in its own process (``python -m hydra_plugins.qtl_launchers._worker``).

Pins itself to its CPU share before anything numerical is imported, runs the Hydra job as
the basic launcher would, and writes the ``JobReturn`` for the launcher to collect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(job_file: str, result_file: str) -> int:
    cpus = os.environ.get("QTL_CPU_SET")
    if cpus:  # XLA and the BLAS pools size themselves to the cores this process may use
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except OSError as err:
            print(f"[gpu_pool] could not pin to cores {cpus}: {err}", flush=True)
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf import open_dict

    with open(job_file, "rb") as f:
        job = cloudpickle.load(f)
    Singleton.set_state(job["singletons"])
    setup_globals()
    hydra_context = job["hydra_context"]
    sweep_config = hydra_context.config_loader.load_sweep_config(job["config"], job["overrides"])
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"gpu_pool_{job['idx']}"
        sweep_config.hydra.job.num = job["idx"]
    print(
        f"[gpu_pool] job #{job['idx']} pid {os.getpid()} "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} cores={cpus}",
        flush=True,
    )
    ret = run_job(
        hydra_context=hydra_context,
        task_function=job["task_function"],
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status == JobStatus.FAILED:
        import traceback

        err = ret._return_value
        traceback.print_exception(type(err), err, err.__traceback__)
    try:
        blob = cloudpickle.dumps(ret)
    except Exception:  # an exception that cannot be pickled: keep its text
        ret.return_value = RuntimeError(repr(ret._return_value))
        blob = cloudpickle.dumps(ret)
    tmp = Path(result_file + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, result_file)
    return 0 if ret.status == JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
