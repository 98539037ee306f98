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
