"""One run as several processes (one per GPU, or per node): JAX's distributed runtime.

``train.processes=N`` runs the same command as N processes. Each calls
``jax.distributed.initialize`` before any JAX work (:func:`start`); from then on
``jax.devices()`` lists every process's devices, the mesh of ``qtl.utils.mesh`` spans them,
and the jitted step runs as one SPMD program whose gradient all-reduce crosses processes
(on CPU over gloo's TCP collectives, on GPUs over NCCL).

Who is who, in this order of precedence:

- the coordinator (process 0's ``host:port``): ``train.coordinator``, else ``QTL_COORDINATOR``,
  else SLURM's environment (JAX derives it from the step's node list and the job id);
- this process's index: ``train.process_id``, else ``QTL_PROCESS_ID``, else ``SLURM_PROCID``.

Roles. Every process trains (each on its rows of every global batch, read from the image
cache) and takes part in every checkpoint save (Orbax's multi-process save: each writes what
it holds, process 0 the metadata). Process 0 alone holds the run directory's lock and writes
the records (run_config.json, metrics.jsonl, results.json, predictions, failed.json), W&B and
the report; it decides at the start whether the run trains, is finished already, or is
refused, and tells the others (:func:`verdict`).

Failure. A process that dies (killed, OOM) stops the others: their next collective fails,
or JAX's coordination service misses its heartbeats, and each exits at once
(:func:`abandon`); the committed checkpoint is intact and a rerun resumes all from the same
step. Under SLURM the survivor requeues the job (``scontrol requeue``, as submitit does on
preemption; at most until the job has restarted :data:`MAX_RESTARTS` times), so every task
restarts and resumes without anyone rerunning the sweep. A coordinator that never answers
ends :func:`start` after ``train.coordinator_timeout_s`` with one line and exit 2, before
anything is computed.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from qtl.utils.errors import QtlUserError

# what process 0 tells the others at the start (any other value: the exit status to mirror)
TRAIN, FINISHED = 0, 1


class DistributedError(QtlUserError):
    """The processes of one run could not form (wrong count, no coordinator): exit 2."""


@dataclass(frozen=True)
class Processes:
    """This process's place in its run."""

    count: int = 1
    index: int = 0
    coordinator: str | None = None

    @property
    def primary(self) -> bool:
        return self.index == 0


_STARTED = Processes()


def current() -> Processes:
    """The processes of the run this process belongs to (1 of 1 before/without :func:`start`)."""
    return _STARTED


def is_primary() -> bool:
    """Whether this process writes the run's records (process 0, or the only one)."""
    return _STARTED.primary


def _int_env(env: Any, name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r}: expected a process index (an integer)") from None


def plan(tc: Any, env: dict[str, str] | None = None) -> Processes:
    """Resolve ``train.processes``/``coordinator``/``process_id`` with the environment
    (see the module docstring); refuses, naming both numbers, a process count that does not
    match what SLURM started."""
    env = os.environ if env is None else env
    count = int(tc.processes)
    if count < 1:
        raise DistributedError(f"train.processes={tc.processes}: expected a positive integer")
    slurm_tasks = env.get("SLURM_NTASKS") if env.get("SLURM_STEP_ID") is not None else None
    if count == 1:
        return Processes()
    if slurm_tasks is not None and int(slurm_tasks) != count:
        raise DistributedError(
            f"train.processes={count} but SLURM started {slurm_tasks} task(s) for this run; "
            f"ask SLURM for {count} tasks (hydra.launcher.tasks_per_node x nodes) or set "
            f"train.processes={slurm_tasks}."
        )
    index = tc.process_id
    if index is None:
        index = _int_env(env, "QTL_PROCESS_ID")
    if index is None:
        index = _int_env(env, "SLURM_PROCID")
    if index is None:
        raise DistributedError(
            f"train.processes={count} but this process's index is unknown: set "
            "train.process_id=<0..N-1> (or QTL_PROCESS_ID), or start the processes with SLURM."
        )
    if not 0 <= int(index) < count:
        raise DistributedError(
            f"train.process_id={index} is out of range for train.processes={count} "
            f"(expected 0..{count - 1})"
        )
    coordinator = tc.coordinator or env.get("QTL_COORDINATOR")
    if coordinator is None and slurm_tasks is None:
        raise DistributedError(
            f"train.processes={count} but no coordinator: set train.coordinator=<host:port> of "
            "process 0 (or QTL_COORDINATOR), or start the processes with SLURM."
        )
    return Processes(count=count, index=int(index), coordinator=coordinator)


def start(tc: Any) -> Processes:
    """Join this run's processes (``train.processes > 1``); a no-op for one process.

    Must run before any JAX computation. On CPU the cross-process collectives use gloo.
    """
    global _STARTED
    wanted = plan(tc)
    if wanted.count == 1 or _STARTED.count > 1:
        return _STARTED
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(tc.coordinator_timeout_s)
    where = wanted.coordinator or "the address SLURM's environment gives"

    def why(cause: str) -> str:
        role = "waiting for the others" if wanted.primary else f"reaching coordinator {where}"
        return (
            f"train.processes={wanted.count}: process {wanted.index} gave up {role} after "
            f"train.coordinator_timeout_s={timeout} s ({cause}). Nothing was computed. Start "
            "all processes with the same train.processes and train.coordinator (process 0 "
            "first), and check that its port is free and reachable."
        )

    # JAX ends a process whose connection times out with a fatal log (an abort, no
    # exception): the watchdog says why in one line first and exits 2.
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout):
            line = f"qtl: DistributedError: {why('not all joined')}"
            print(f"\n{line}\n", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=wanted.coordinator,
            num_processes=wanted.count,
            process_id=wanted.index,
            initialization_timeout=timeout + 60,  # the watchdog's is the one that acts
            # a process that ends waits this long for its peers at exit, not JAX's 300 s
            shutdown_timeout_seconds=60,
        )
    except Exception as err:  # noqa: BLE001 - JAX raises XlaRuntimeError/RuntimeError here
        raise DistributedError(why(" ".join(str(err).split())[:300])) from err
    finally:
        done.set()
    seen = jax.process_count()
    if seen != wanted.count:  # pragma: no cover - JAX itself refuses a mismatch
        raise DistributedError(
            f"train.processes={wanted.count} but {seen} process(es) joined the run"
        )
    _STARTED = wanted
    return _STARTED


def _broadcast(value: int) -> int:
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def verdict(value: int | None = None) -> int:
    """Process 0 tells the others how the run goes on (``TRAIN``, ``FINISHED`` or an exit
    status); every process calls it exactly once per run, the others with no value."""
    if _STARTED.count == 1:
        return TRAIN if value is None else value
    return _broadcast(TRAIN if value is None else value)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a stop signal seen by one is acted on by all
    at the same step)."""
    if _STARTED.count == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.asarray(flags).any())


def abandon(err: BaseException) -> None:
    """End this process at once after a runtime failure of a multi-process run (a lost peer
    makes the next collective fail here): one line, exit status 1, without JAX's shutdown
    barrier, which would wait for the lost peer for a minute and then abort. The committed
    checkpoint is intact; rerunning every process resumes from it. One process: returns."""
    if _STARTED.count == 1:
        return
    import sys
    import traceback

    from jax.errors import JaxRuntimeError

    if not isinstance(err, JaxRuntimeError):  # not a failed collective: a bug's traceback
        traceback.print_exception(err)
    first = " ".join(str(err).split())[:400]
    print(
        f"\nqtl: process {_STARTED.index} of {_STARTED.count} stops: {type(err).__name__}: "
        f"{first} - most likely another process of this run was lost (killed, out of memory, "
        "node down); the last checkpoint is intact and rerunning all processes resumes "
        f"from it.{_requeue()}\n",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


MAX_RESTARTS = 3  # a SLURM job restarted this often is not requeued again for a lost peer


def _requeue() -> str:
    """Under SLURM, requeue the job (every task restarts and resumes), as submitit does on
    preemption; at most until the job has restarted :data:`MAX_RESTARTS` times, so a
    process that dies every time (out of memory) does not loop forever."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts >= MAX_RESTARTS:
        return f" SLURM job {job} restarted {restarts} times already: not requeued again."
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f" Requeueing SLURM job {job} failed ({err}); rerun it."
    if done.returncode != 0:
        return f" Requeueing SLURM job {job} failed ({done.stderr.strip()[:200]}); rerun it."
    return f" SLURM job {job} requeued: all its tasks restart and resume."


def barrier(name: str) -> None:
    """Wait until every process of the run is here."""
    if _STARTED.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = [
    "FINISHED",
    "abandon",
    "TRAIN",
    "DistributedError",
    "Processes",
    "any_process",
    "barrier",
    "current",
    "is_primary",
    "plan",
    "start",
    "verdict",
]
