"""The one place that turns ``cfg.paths`` into folders.

Code that holds a config asks here (``data_dir(cfg.paths)``); process-wide consumers that
never see a config (the native-kernel loader, JAX's compilation cache, worker processes) get
the same roots through :func:`export`, which the applications call first.
"""

from __future__ import annotations

import os
from pathlib import Path

from qtl.config import PathsConfig

KERNEL_ENV = "QTL_KERNEL_CACHE"
JAX_ENV = "QTL_JAX_CACHE"


def _path(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def cache_dir(paths: PathsConfig) -> Path:
    return _path(paths.cache_dir)


def data_dir(paths: PathsConfig) -> Path:
    return _path(paths.data_dir)


def feature_cache(paths: PathsConfig) -> Path:
    return _path(paths.feature_cache)


def pretrained_dir(paths: PathsConfig) -> Path:
    return _path(paths.pretrained_dir)


def kernel_dir(paths: PathsConfig | None = None) -> Path:
    """Compiled kernels: ``$QTL_KERNEL_CACHE`` (set by :func:`export`), else the default."""
    if paths is not None:
        return _path(paths.kernel_dir)
    env = os.environ.get(KERNEL_ENV)
    return _path(env) if env else _path(PathsConfig.kernel_dir)


def jax_cache(paths: PathsConfig | None = None) -> Path:
    if paths is not None:
        return _path(paths.jax_cache)
    env = os.environ.get(JAX_ENV)
    return _path(env) if env else _path(PathsConfig.jax_cache)


def export(paths: PathsConfig) -> None:
    """Make the process-wide roots visible to code and subprocesses that get no config."""
    os.environ[KERNEL_ENV] = str(kernel_dir(paths))
    os.environ[JAX_ENV] = str(jax_cache(paths))
