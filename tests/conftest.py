"""Shared fixtures: compose the real conf/ with tiny overrides, as a user's command would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
# One compilation cache for the session and its subprocesses: each step compiles once.
os.environ.setdefault("QTL_JAX_CACHE", str(ROOT / ".cache" / "jax-tests"))
# ... and every program in it, however fast it compiles: the suite starts the same tiny runs
# dozens of times, and their sub-second compiles were ~a third of each launch.
os.environ.setdefault("QTL_JAX_CACHE_MIN_SECONDS", "0")

from qtl.runtime import configure_jax  # noqa: E402

configure_jax()

from helpers import TINY, compose, launch  # noqa: E402,F401  (shared scaffolding)


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


# Runs that need more training rows than debug=tiny's; a folder of its own, because a
# synthetic set asked for with other sizes replaces the one in data.root, under any run
# (this worker's or a SLURM job it started) still reading it.
LARGE_SIZES = "data.synth_sizes={train:400,val:48,test:48,external:40}"


@pytest.fixture(scope="session")
def synth_root_large(tmp_path_factory) -> Path:
    """A second synthetic dataset, with ``LARGE_SIZES``, shared like ``synth_root``."""
    return tmp_path_factory.mktemp("synthetic-large")


# The longest files first (their totals in a `make test` on the 2-core EPYC, descending):
# pytest-xdist hands whole files to the workers in collection order (--dist loadfile), so a
# long file collected last would keep one worker busy while the other has finished.
_LONGEST_FIRST = (
    "test_slurm.py",
    "test_devices.py",
    "test_search.py",
    "test_fast_sim.py",
    "test_kernel_isa.py",
    "test_sweep_stop.py",
    "test_processes.py",
    "test_bench_step.py",
    "test_train_e2e.py",
    "test_noise.py",
    "test_native_kernel.py",
    "test_install.py",
    "test_qvit_study.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable for the rest
