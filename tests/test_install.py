"""The core install is JAX only: training (both studies) and search never import PyTorch,
TensorFlow or transformers, even where the test extra has installed them (they serve
mode=bench_step only), so `make demo` and `make demo-qvit` work in an environment without them.
Nor do they import PennyLane: on qtl's own simulator the circuit is a plain gate list, and
PennyLane's import (~2-3 s) is paid only by runs on its devices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, TINY
from helpers import _env

OTHER_FRAMEWORKS = ("torch", "tensorflow", "keras", "transformers", "pennylane")

# launch.py as `python launch.py ...` runs it, reporting at exit which frameworks were imported
PROBE = f"""
import atexit, runpy, sys
atexit.register(lambda: print("QTL_IMPORTED=" + ",".join(
    m for m in {OTHER_FRAMEWORKS!r} if m in sys.modules), flush=True))
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path({str(ROOT / "launch.py")!r}, run_name="__main__")
"""


def _imported(*args: str, cwd) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd, env=_env(None), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("QTL_IMPORTED=")]
    return [m for m in line.removeprefix("QTL_IMPORTED=").split(",") if m]


@pytest.mark.slow
def test_training_and_search_import_no_other_framework(tmp_path):
    # the DQC head runs everything the CDL head does, and the circuit besides
    assert _imported("-m", *TINY, "head=dqc", f"hydra.sweep.dir={tmp_path / 'demo'}",
                     cwd=tmp_path) == []  # fmt: skip
    search = ["experiment=search", *TINY, "head=cdl", "hydra.sweeper.n_trials=1"]
    assert _imported("-m", *search, f"hydra.sweep.dir={tmp_path / 'search'}", cwd=tmp_path) == []
    # the second study (make demo-qvit): a QViT distilled from its CNN teacher
    qvit = ["debug=tiny_medmnist", "model=qvit", "distill=joint"]
    assert _imported("-m", *qvit, f"hydra.sweep.dir={tmp_path / 'qvit'}", cwd=tmp_path) == []
