"""``hydra/launcher=gpu_pool``: a sweep on one workstation, at most one job per GPU.

Why not Hydra's stock launchers: ``basic`` runs jobs one after another, and
``submitit_local`` starts every job at once without giving each its own GPU. Here each job
is a subprocess that sees exactly one GPU (``CUDA_VISIBLE_DEVICES``), the rest wait in a
queue, and a job that crashes (even hard: OOM-kill, segfault) fails alone. Without GPUs,
N jobs run at once, each pinned to its own share of the CPU cores, with thread counts to
match. JAX's GPU memory is set deliberately: allocate on demand by default, or a fixed
fraction per job (``xla_mem_fraction``).

What passes between the launcher and a job is data only: the job's config as YAML and a
JSON job file (what to import, the resolver cache, the callbacks' plain state) going out, a
JSON result (status, JSON return value, error type/message/traceback) coming back, all
signed with a key only the two processes hold (``_files``). Nothing is unpickled, so a file
someone else left in the sweep folder can at most be refused.
"""
# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is
# in sys.modules, and dataclasses then cannot resolve string annotations.

import builtins
import copy
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import version
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.qtl_launchers._files import (
    JOB,
    RESULT,
    RESULT_FIELDS,
    JobFileError,
    new_key,
    read_signed,
    sha256,
    write_private,
    write_signed,
)
from qtl.utils.errors import Handled

log = logging.getLogger(__name__)

# Thread-pool sizes of the numerical libraries a job may load.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class GpuPoolLauncherConf:
    _target_: str = "hydra_plugins.qtl_launchers.gpu_pool.GpuPoolLauncher"
    # GPU ids to spread jobs over, one job per GPU at a time; null = all GPUs nvidia-smi
    # lists (none found: CPU-only); [] = CPU-only even on a GPU machine
    gpus: list[str] | None = None
    # CPU-only: jobs at once (cores divided between them); null = one job per 4 cores
    cpu_jobs: int | None = None
    # GPU memory per job: null = allocate on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false);
    # a number in (0, 1] = preallocate that fraction of the job's GPU
    xla_mem_fraction: float | None = None
    # extra environment variables for every job
    env: dict[str, str] = field(default_factory=dict)
    # where each job's stdout/stderr goes (job<N>.log), and its job/result files while it runs
    log_dir: str = "${hydra.sweep.dir}/.gpu_pool"
    # seconds a job gets to save a checkpoint after SIGTERM when the sweep is interrupted
    stop_grace_s: float = 60.0
    # GPUs each job gets (for train.devices=k); the grid runs len(gpus) // k jobs at once.
    # Without GPUs: each CPU job sees k XLA host devices (to try train.devices=k)
    gpus_per_job: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf, provider="qtl"
)


@dataclass
class Slot:
    """One place a job can run: a GPU (or a CPU share) and the cores that go with it."""

    name: str
    env: dict[str, str]
    cpus: list[int]


def detect_gpus() -> list[str]:
    """GPU indices nvidia-smi reports; [] when there is no NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def make_slots(
    gpus: list[str] | None,
    cpu_jobs: int | None,
    xla_mem_fraction: float | None,
    cores: list[int] | None = None,
    gpus_per_job: int = 1,
) -> list[Slot]:
    """The pool: one slot per ``gpus_per_job`` GPUs (GPUs left over stay idle), or
    ``cpu_jobs`` CPU slots; cores split evenly."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    gpu_ids = detect_gpus() if gpus is None else [str(g) for g in gpus]
    if len(set(gpu_ids)) != len(gpu_ids):
        raise ValueError(f"hydra.launcher.gpus lists a GPU twice: {gpu_ids}")
    k = int(gpus_per_job)
    if k < 1:
        raise ValueError(f"hydra.launcher.gpus_per_job={gpus_per_job}: expected >= 1")
    if gpu_ids and len(gpu_ids) < k:
        raise ValueError(
            f"hydra.launcher.gpus_per_job={k} but only {len(gpu_ids)} GPU(s) are there "
            f"({', '.join(gpu_ids)}); ask for at most {len(gpu_ids)}"
        )
    groups = [gpu_ids[i : i + k] for i in range(0, len(gpu_ids) - k + 1, k)]
    if xla_mem_fraction is not None and not 0.0 < xla_mem_fraction <= 1.0:
        raise ValueError(
            f"hydra.launcher.xla_mem_fraction={xla_mem_fraction}: expected null or (0, 1]"
        )
    if gpu_ids:
        n = len(groups)
    else:
        n = cpu_jobs if cpu_jobs is not None else max(1, len(cores) // 4)
        if n < 1:
            raise ValueError(f"hydra.launcher.cpu_jobs={cpu_jobs}: expected null or >= 1")
    per = max(1, len(cores) // n)
    slots = []
    for i in range(n):
        share = [cores[(i * per + j) % len(cores)] for j in range(per)]
        env = {var: str(per) for var in _THREAD_VARS}
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[i])
            if xla_mem_fraction is None:
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            else:
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(xla_mem_fraction)
            name = f"GPU {','.join(groups[i])}" if k == 1 else f"GPUs {','.join(groups[i])}"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["JAX_PLATFORMS"] = "cpu"
            if k > 1:  # k host devices, so that train.devices=k runs as it would on k GPUs
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={k}"
            name = f"CPU slot {i} (cores {','.join(map(str, share))})"
        env["QTL_CPU_SET"] = ",".join(map(str, share))
        slots.append(Slot(name=name, env=env, cpus=share))
    return slots


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (or SIGHUP: the terminal or SSH session closed) to the launcher: stop the jobs
    as for Ctrl-C (they checkpoint first)."""
    raise KeyboardInterrupt(f"signal {signum}")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_launcher(launcher: int):  # -> a preexec_fn for Popen
    """In the job, before it runs: SIGTERM when the launcher dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so a killed sweep never leaves jobs training on; SIGTERM makes them
    checkpoint and leave, and the rerun resumes them."""

    def arm() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the launcher's own stop still works
            return
        if os.getppid() != launcher:  # it died before the line above armed the signal
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def task_reference(task_function: TaskFunction) -> dict[str, Any]:
    """How a job process finds the task function again: its module (or, for a script, the
    script's file) and its name there. Checked here, so a task function that cannot be found
    that way fails the sweep at once with the reason, not in every job."""
    name = task_function.__qualname__
    module_name = task_function.__module__
    module = sys.modules.get(module_name)
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
    if "<" in name or module is None or getattr(found, "__wrapped__", found) is not task_function:
        raise ValueError(
            f"hydra/launcher=gpu_pool: the task function {module_name}.{name} is not defined "
            "at the top level of its module, so a job process cannot import it; define the "
            "@hydra.main function at module level"
        )
    if module_name != "__main__":
        return {"module": module_name, "file": None, "name": name}
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":  # python -m package.app
        return {"module": spec.name, "file": None, "name": name}
    file = getattr(module, "__file__", None)
    if not file:
        raise ValueError("hydra/launcher=gpu_pool needs an app file (not an interactive session)")
    return {"module": None, "file": str(Path(file).resolve()), "name": name}


def _cache_to_json(config: DictConfig) -> list[list[Any]]:
    """OmegaConf's resolver cache (e.g. ``${now:...}``) as [name, args, value] rows."""
    rows = []
    for name, entries in OmegaConf.get_cache(config).items():
        for args, value in entries.items():
            row = [name, list(args) if isinstance(args, tuple) else [args], value]
            try:
                json.dumps(row)
            except (TypeError, ValueError):
                log.warning(
                    f"gpu_pool: resolver cache ${{{name}:...}} is not JSON; jobs re-resolve it"
                )
                continue
            rows.append(row)
    return rows


def _callback_states(hydra_context: HydraContext) -> list[dict[str, Any]]:
    """Each sweep callback's class and attributes, for the job's fresh copy of it (what
    pickling the callback would carry, limited to plain data: JSON, and configs as YAML)."""
    states = []
    for cb in hydra_context.callbacks.callbacks:
        state, configs = {}, {}
        for attr, value in vars(cb).items():
            if OmegaConf.is_config(value):
                configs[attr] = OmegaConf.to_yaml(value, resolve=False)
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                log.warning(
                    f"gpu_pool: callback {type(cb).__name__}.{attr} is neither JSON nor a "
                    "config; each job gets the value its constructor sets"
                )
                continue
            state[attr] = value
        cls = f"{type(cb).__module__}.{type(cb).__qualname__}"
        states.append({"class": cls, "state": state, "configs": configs})
    return states


class RemoteJobError(Handled, RuntimeError):
    """An exception raised inside a gpu_pool job, carried back as text: Hydra records it as
    that job's failure (the sweep goes on and then exits 1), as for a job run in-process."""

    remote_traceback: str = ""


def remote_error(error: dict[str, Any]) -> BaseException:
    """The job's exception, rebuilt from its type name and message: a built-in exception
    type as itself, any other as a RemoteJobError subclass of the same name (no import)."""
    name, module = str(error.get("type", "Exception")), str(error.get("module", ""))
    message = str(error.get("message", ""))
    err: BaseException | None = None
    builtin = getattr(builtins, name, None) if module == "builtins" else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            err = builtin(message)
        except Exception:  # built-ins whose constructor wants more than a message
            err = None
    if err is None:
        cls = type(name.rsplit(".", 1)[-1], (RemoteJobError,), {"__module__": module})
        err = cls(message)
    err.remote_traceback = str(error.get("traceback", ""))  # type: ignore[attr-defined]
    return err


@dataclass
class _Running:
    idx: int
    slot: Slot
    proc: subprocess.Popen
    job_file: Path
    config_file: Path
    result_file: Path
    log_file: Path
    config: DictConfig
    started: float


class GpuPoolLauncher(Launcher):
    """Runs each job in its own subprocess on a free slot; see the module docstring."""

    def __init__(self, **params: Any) -> None:
        self.params = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in params.items()
        }
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        p = self.params
        slots = make_slots(
            p.get("gpus"),
            p.get("cpu_jobs"),
            p.get("xla_mem_fraction"),
            gpus_per_job=p.get("gpus_per_job", 1),
        )
        task = task_reference(self.task_function)
        callbacks = _callback_states(self.hydra_context)
        key = new_key()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log_dir = Path(str(p["log_dir"])).absolute()
        log_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            f"gpu_pool: {len(job_overrides)} jobs on {len(slots)} slot(s): "
            + "; ".join(s.name for s in slots)
            + f" (logs: {log_dir})"
        )
        pending = deque(enumerate(job_overrides, start=initial_job_idx))
        free = deque(slots)
        running: list[_Running] = []
        results: dict[int, JobReturn] = {}
        previous = {s: signal.signal(s, _raise_interrupt) for s in _STOP_SIGNALS}
        try:
            while pending or running:
                while pending and free:
                    idx, overrides = pending.popleft()
                    job = self._start(
                        idx, list(overrides), free.popleft(), log_dir, task, callbacks, key
                    )
                    running.append(job)
                time.sleep(0.05)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    free.append(job.slot)
                    results[job.idx] = self._collect(job, key)
        except BaseException:
            self._stop(running, float(p.get("stop_grace_s", 60.0)))
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return [results[i] for i in sorted(results)]

    def _start(
        self,
        idx: int,
        overrides: list[str],
        slot: Slot,
        log_dir: Path,
        task: dict[str, Any],
        callbacks: list[dict[str, Any]],
        key: bytes,
    ) -> _Running:
        assert self.config is not None and self.hydra_context is not None
        # composed here, as Hydra's basic launcher does: the job gets the launcher's values
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"gpu_pool_{idx}"
            sweep_config.hydra.job.num = idx
        job_file = log_dir / f"job{idx}.json"
        config_file = log_dir / f"job{idx}.yaml"
        result_file = log_dir / f"job{idx}.result.json"
        log_file = log_dir / f"job{idx}.log"
        result_file.unlink(missing_ok=True)
        text = OmegaConf.to_yaml(sweep_config, resolve=False).encode()
        write_private(config_file, text)
        version_base = version.getbase()
        body = {
            "job": idx,
            "overrides": overrides,
            "config_file": config_file.name,
            "config_sha256": sha256(text),
            "task": task,
            "version_base": None if version_base is None else str(version_base),
            "resolver_cache": _cache_to_json(sweep_config),
            "callbacks": callbacks,
        }
        write_signed(job_file, JOB, body, key)
        env = {**os.environ, **{str(k): str(v) for k, v in self.params["env"].items()}}
        env.update(slot.env)
        # the job imports the same code as this process (the app's folder first)
        script_dir = sys.path[0] or os.getcwd()
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (script_dir, os.environ.get("PYTHONPATH")) if x
        )
        log.info(f"\t#{idx} on {slot.name}: {' '.join(filter_overrides(overrides))}")
        with log_file.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hydra_plugins.qtl_launchers._worker",
                    str(job_file),
                    str(result_file),
                ],
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops jobs cleanly
                preexec_fn=_die_with_launcher(os.getpid()),
            )
        assert proc.stdin is not None
        try:  # the key travels over a pipe: in no file, in no environment
            proc.stdin.write(key.hex().encode() + b"\n")
            proc.stdin.close()
        except BrokenPipeError:  # the process died at once; _collect reports it
            pass
        return _Running(
            idx, slot, proc, job_file, config_file, result_file, log_file, sweep_config, time.time()
        )

    @staticmethod
    def _collect(job: _Running, key: bytes) -> JobReturn:
        seconds = time.time() - job.started
        task_cfg = copy.deepcopy(job.config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        ret = JobReturn(
            overrides=list(job.config.hydra.overrides.task),
            cfg=task_cfg,
            hydra_cfg=OmegaConf.create({"hydra": job.config.hydra}),
            status=JobStatus.FAILED,
        )
        if job.result_file.exists():
            try:
                res = read_signed(job.result_file, RESULT, key, RESULT_FIELDS)
                if res["job"] != job.idx or res["status"] not in ("COMPLETED", "FAILED"):
                    raise JobFileError(
                        f"{job.result_file}: a result for job #{res['job']} with status "
                        f"{res['status']!r}, expected job #{job.idx}, COMPLETED or FAILED"
                    )
            except JobFileError as err:
                ret.return_value = err
            else:
                ret.status = JobStatus[res["status"]]
                ret.task_name, ret.working_dir = res["task_name"], res["working_dir"]
                if res["output_dir"] is not None:  # the sweeper reads the run folder from here
                    OmegaConf.update(
                        ret.hydra_cfg, "hydra.runtime.output_dir", res["output_dir"], force_add=True
                    )
                if ret.status == JobStatus.COMPLETED:
                    ret.return_value = res["return_value"]
                    if res["return_repr"] is not None:
                        log.info(
                            f"\t#{job.idx} returned a value JSON cannot carry back "
                            f"({res['return_repr'][:200]}); its return value here is None"
                        )
                else:
                    err = remote_error(res["error"] or {})
                    err.add_note(
                        f"(raised in gpu_pool job #{job.idx}; traceback in {job.log_file})"
                    )
                    ret.return_value = err
            job.result_file.unlink(missing_ok=True)
        else:  # the process died before Hydra could record the job (killed, OOM, bad job file)
            ret.return_value = RuntimeError(
                f"job #{job.idx} process exited with code {job.proc.returncode} before "
                f"finishing{_last_error(job.log_file)}; its output is in {job.log_file}"
            )
        job.job_file.unlink(missing_ok=True)
        job.config_file.unlink(missing_ok=True)
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, JobFileError):
            log.error(f"\t#{job.idx}: {ret._return_value}")
        state = "done" if ret.status == JobStatus.COMPLETED else "FAILED"
        log.info(f"\t#{job.idx} {state} on {job.slot.name} after {seconds:.1f} s")
        return ret

    @staticmethod
    def _stop(running: list[_Running], grace: float) -> None:
        """Interrupted sweep: SIGTERM lets each job checkpoint; KILL what is left after grace."""
        for job in running:
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for job in running:
            try:
                job.proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()


def _last_error(log_file: Path) -> str:
    """The worker's own refusal (``[gpu_pool] error: ...``), if that is why it stopped."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if line.startswith("[gpu_pool] error: "):
            return f" ({line.removeprefix('[gpu_pool] error: ')[:500]})"
    return ""
