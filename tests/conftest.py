"""Shared fixtures: compose the real conf/ with tiny overrides, as a user's command would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
# One compilation cache for the session and its subprocesses: each step compiles once.
os.environ.setdefault("QTL_JAX_CACHE", str(ROOT / ".cache" / "jax-tests"))

from qtl.runtime import configure_jax  # noqa: E402

configure_jax()

# A run that trains in seconds: tiny synthetic data, tiny ResNet, two epochs.
TINY = [
    "experiment=demo",
    "task=cxr8",
    "data.synth_sizes={train:96,val:48,test:48,external:40}",
    "data.synth_image_px=48",
    "data.resize=36",
    "data.crop=32",
    "backbone.embedding_size=8",
    "backbone.hidden_sizes=[8,16]",
    "backbone.depths=[1,1]",
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "train.max_epochs=2",
    "backbone.pretrain_epochs=1",
    "progress=false",
]


def compose(*overrides: str):
    """The typed config that ``python launch.py <overrides>`` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qtl.config import register_configs, to_schema

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_schema(hydra_compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="session", autouse=True)
def _session_workdir(tmp_path_factory):
    """Run in-process jobs in a scratch folder: their .cache/ and outputs/ never touch the repo."""
    old = Path.cwd()
    work = tmp_path_factory.mktemp("work")
    os.chdir(work)
    yield work
    os.chdir(old)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """One tiny synthetic dataset shared by the session's end-to-end tests."""
    return tmp_path_factory.mktemp("synthetic")


def launch(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python launch.py`` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
