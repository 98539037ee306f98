"""One gpu_pool job in its own process (``python -m hydra_plugins.qtl_launchers._worker``).

Pins itself to its CPU share before anything numerical is imported, rebuilds the Hydra job
from its signed JSON job file and config YAML (see ``_files``), runs it as Hydra's basic
launcher would (``run_job``), and writes a signed JSON result for the launcher to collect.
The signing key arrives on stdin, so it is in no file and in no environment a job's own
subprocesses inherit.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from hydra_plugins.qtl_launchers._files import (
    JOB,
    JOB_FIELDS,
    RESULT,
    JobFileError,
    read_signed,
    sha256,
    write_signed,
)

# Name a script app is imported under: not "__main__", so its `if __name__ == "__main__"`
# block does not run the app again (the name multiprocessing uses for the same purpose).
SCRIPT_MODULE = "__mp_main__"


def read_key(stream: Any) -> bytes:
    """The job's signing key: one hex line on stdin."""
    line = stream.readline().strip()
    try:
        key = bytes.fromhex(line.decode() if isinstance(line, bytes) else line)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise JobFileError(
            "no job key on stdin: this worker is started by hydra/launcher=gpu_pool, which "
            "passes the key that its job file is signed with"
        )
    return key


def read_job(job_file: Path, key: bytes) -> tuple[dict[str, Any], Any]:
    """The job's metadata and its config, both checked against the launcher's signature."""
    from omegaconf import OmegaConf

    job = read_signed(job_file, JOB, key, JOB_FIELDS)
    if Path(job["config_file"]).name != job["config_file"]:
        raise JobFileError(f"{job_file}: config_file must be a file name next to it")
    config_file = job_file.parent / job["config_file"]
    try:
        text = config_file.read_bytes()
    except OSError as err:
        raise JobFileError(f"cannot read the job's config {config_file}: {err}") from None
    if sha256(text) != job["config_sha256"]:
        raise JobFileError(
            f"{config_file} is not the config the launcher wrote for job #{job['job']} "
            "(its sha256 differs from the one in the signed job file): refusing it"
        )
    config = _typed(OmegaConf.create(text.decode("utf-8")))
    OmegaConf.set_cache(config, _cache_from_json(job["resolver_cache"]))
    return job, config


def _typed(config: Any) -> Any:
    """The config as Hydra composed it: the ``hydra`` node back on its schema (so
    ``hydra.mode`` is a RunMode again, not a string), the root in struct mode."""
    from hydra.conf import HydraConf
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(HydraConf)
    OmegaConf.set_struct(schema, False)  # Hydra's groups add keys the schema lacks (hydra.env)
    config.hydra = OmegaConf.merge(schema, config.hydra)
    OmegaConf.set_struct(config, True)
    return config


def _cache_from_json(entries: list[Any]) -> dict[str, dict[tuple[str, ...], Any]]:
    """OmegaConf's resolver cache (``${now:...}`` et al.): the launcher's values, so a job
    resolves the sweep folder to the same time stamp the launcher did."""
    cache: dict[str, dict[tuple[str, ...], Any]] = {}
    for name, args, value in entries:
        cache.setdefault(name, {})[tuple(args)] = value
    return cache


def import_task(ref: dict[str, Any]) -> Any:
    """The undecorated task function, imported by module name or from the app's file."""
    name = ref.get("name")
    if not isinstance(name, str) or not name:
        raise JobFileError(f"task reference {ref!r} has no function name")
    module: ModuleType
    if ref.get("file"):
        spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, ref["file"])
        if spec is None or spec.loader is None:
            raise JobFileError(f"cannot import the app file {ref['file']}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[SCRIPT_MODULE] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref["module"])
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__wrapped__", obj)  # @hydra.main wraps the task function


def _callbacks(config: Any, saved: list[dict[str, Any]]) -> Any:
    """The sweep's callbacks built from the config, with the launcher's (JSON) state."""
    from hydra._internal.callbacks import Callbacks
    from omegaconf import OmegaConf

    callbacks = Callbacks(config)
    names = [f"{type(c).__module__}.{type(c).__qualname__}" for c in callbacks.callbacks]
    if names != [s.get("class") for s in saved]:
        raise JobFileError(
            f"the job's callbacks {names} differ from the launcher's "
            f"{[s.get('class') for s in saved]}"
        )
    for cb, s in zip(callbacks.callbacks, saved, strict=True):
        vars(cb).update(s.get("state", {}))
        for attr, text in s.get("configs", {}).items():
            setattr(cb, attr, OmegaConf.create(text))
    return callbacks


def _config_loader(config: Any) -> Any:
    """A config loader over the app's config sources, for task functions that compose."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.plugins import Plugins

    Plugins.instance()  # registers the config source kinds (file://, pkg://, structured://)
    search_path = ConfigSearchPathImpl()
    for src in config.hydra.runtime.config_sources:
        search_path.append(provider=src.provider, path=f"{src.schema}://{src.path}")
    return ConfigLoaderImpl(config_search_path=search_path)


def _json_value(value: Any) -> tuple[Any, str | None]:
    """(value, None) when JSON can carry it, else (None, its repr)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None, repr(value)[:2000]
    return value, None


def _error(err: BaseException) -> dict[str, Any]:
    return {
        "type": type(err).__qualname__,
        "module": type(err).__module__,
        "message": str(err),
        "traceback": "".join(traceback.format_exception(err))[-20000:],
    }


def main(job_file: str, result_file: str) -> int:
    cpus = os.environ.get("QTL_CPU_SET")
    if cpus:  # XLA and the BLAS pools size themselves to the cores this process may use
        try:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        except OSError as err:
            print(f"[gpu_pool] could not pin to cores {cpus}: {err}", flush=True)
    try:
        key = read_key(sys.stdin.buffer)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the job reads nothing from the launcher
        job, config = read_job(Path(job_file), key)
    except JobFileError as err:
        print(f"[gpu_pool] error: {err}", file=sys.stderr, flush=True)
        return 2

    from hydra import version
    from hydra.core.utils import JobRuntime, JobStatus, run_job, setup_globals
    from hydra.types import HydraContext
    from omegaconf import OmegaConf
    from packaging.version import Version

    setup_globals()
    if job["version_base"] is not None:
        version.VersionBase.instance().setbase(Version(job["version_base"]))
    JobRuntime.instance().set("name", config.hydra.job.name)
    task_function = import_task(job["task"])
    hydra_context = HydraContext(
        config_loader=_config_loader(config), callbacks=_callbacks(config, job["callbacks"])
    )
    print(
        f"[gpu_pool] job #{job['job']} pid {os.getpid()} "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} cores={cpus}",
        flush=True,
    )
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    completed = ret.status == JobStatus.COMPLETED
    if completed:
        value, value_repr = _json_value(ret._return_value)
        error = None
    else:
        err = ret._return_value
        traceback.print_exception(type(err), err, err.__traceback__)
        value, value_repr, error = None, None, _error(err)
    body = {
        "job": job["job"],
        "status": ret.status.name,
        "return_value": value,
        "return_repr": value_repr,
        "error": error,
        "task_name": ret.task_name,
        "working_dir": ret.working_dir,
        "output_dir": OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir")
        if ret.hydra_cfg is not None
        else None,
    }
    write_signed(Path(result_file), RESULT, body, key)
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
