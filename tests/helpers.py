"""Test scaffolding shared by every test file: one launcher, one record reader and builder,
one kill-and-wait. Records are read and built through qtl's own record code
(:mod:`qtl.record.files`), so a renamed field cannot leave a test reading stale keys."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# A run that trains in seconds: the real config's debug group (conf/debug/tiny.yaml).
TINY = ["debug=tiny"]


def compose(*overrides: str):
    """The typed config that ``python launch.py <overrides>`` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qtl.config import to_schema
    from qtl.studies import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_schema(hydra_compose(config_name="config", overrides=list(overrides)))


def _env(env: dict | None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}


def launch(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run ``python launch.py`` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_when(
    *args: str,
    cwd: Path,
    condition: Callable[[], bool],
    env: dict | None = None,
    timeout: float = 300,
    sig: int = signal.SIGKILL,
) -> int:
    """Start ``launch.py``, send ``sig`` to its process group once ``condition()`` holds,
    wait for it, and return its exit status (negative: the signal that ended it)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if condition():
                    os.killpg(proc.pid, sig)
                    break
            except Exception:  # noqa: BLE001 - a file being written right now: look again
                pass
            time.sleep(0.02)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl through qtl's reader, as plain rows."""
    from qtl.record.files import RunFiles

    return [row.to_json() for row in RunFiles(run_dir, create=False).read_metrics()]


def read_results(run_dir: Path) -> dict[str, Any]:
    """results.json through qtl's reader (validated against the schema), as a plain dict."""
    from qtl.record.files import RunFiles

    results = RunFiles(run_dir, create=False).read_results()
    assert results is not None, f"no results.json in {run_dir}"
    return results.to_json()


def read_failure(run_dir: Path) -> dict[str, Any]:
    """failed.json through qtl's reader, as a plain dict."""
    from qtl.record.files import RunFiles

    failure = RunFiles(run_dir, create=False).read_failure()
    assert failure is not None, f"no failed.json in {run_dir}"
    return failure.to_json()


def make_results(**fields: Any):
    """A results record built with the writer's own schema; ``fields`` override defaults."""
    from qtl.record.schema import Results, SplitScores

    labels = fields.pop("labels", ["Atelectasis", "Effusion"])
    auroc = {
        split: block if isinstance(block, SplitScores) else SplitScores(**block)
        for split, block in fields.pop("auroc", {}).items()
    }
    base: dict[str, Any] = {
        "run": "hand/cxr8-cdl/seed0",
        "task": "cxr8",
        "head": "cdl",
        "seed": 0,
        "labels": labels,
        "fingerprint": "0" * 16,
        "config": {},
        "parameters": {},
        "epochs": 1,
        "best_epoch": 1,
        "stopped": "max_epochs",
        "best_val_loss": 0.5,
        "final_val_loss": 0.5,
        "loss": {},
        "auroc": auroc,
    }
    return Results(**{**base, **fields})
