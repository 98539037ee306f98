"""A NaN/Inf loss or gradient stops training cleanly: a message naming the epoch, the batch
and the learning-rate knobs, the last good checkpoint kept (the bad update never saved), the
failure recorded in failed.json, and the run listed as failed - with that reason - by the
summary, the sweep summary and the report. A rerun refuses instead of diverging again."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY, compose, launch
from helpers import read_failure
from helpers import read_metrics as _metrics

from qtl.apps.train import train_and_evaluate
from qtl.train.preempt import TrainingDiverged

pytestmark = pytest.mark.slow


def _steps(run_dir: Path, which: str) -> list[int]:
    folder = run_dir / "checkpoints" / which
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_nan_stops_at_its_batch_and_keeps_the_last_good_checkpoint(
    synth_root, tmp_path, monkeypatch
):
    """A NaN label in batch 3 of epoch 2 makes the real step's loss and gradients NaN."""
    import qtl.train.loop as loop
    from qtl.studies.cxr import CxrStudy
    from qtl.studies.pretrain import build_pretrained_model
    from qtl.train.checkpoint import Checkpoints
    from qtl.train.step import init_state, make_steps

    cfg = compose(*TINY, f"data.root={synth_root}", "head=cdl")
    real_batches = loop.batches

    def poisoned(*args, **kwargs):
        for i, b in enumerate(real_batches(*args, **kwargs)):
            if kwargs.get("epoch") == 2 and i == 2:
                labels = b.labels.copy()
                labels[0, 0] = np.nan
                b = dataclasses.replace(b, labels=labels)
            yield b

    monkeypatch.setattr(loop, "batches", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        train_and_evaluate(cfg, run_dir)
    message = str(err.value)
    assert "training diverged at epoch 2, batch 3 of 6" in message
    assert "train.lr=0.001" in message and "train.backbone_lr=0.0001" in message
    assert "checkpoint after epoch 1" in message

    failed = read_failure(run_dir)
    assert failed["status"] == "failed" and failed["reason"] == "non_finite"
    assert (failed["epoch"], failed["batch"], failed["step"]) == (2, 3, 6 + 3)
    assert failed["message"] == message
    assert not (run_dir / "results.json").exists()
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]

    # the bad update was never saved: what is on disk is epoch 1's state, all finite
    assert _steps(run_dir, "last") == [6] and _steps(run_dir, "best") == [1]
    model = build_pretrained_model(cfg, cfg.seed, CxrStudy())
    steps = make_steps(model, cfg)
    ckpts = Checkpoints(run_dir / "checkpoints")
    try:
        state, meta = ckpts.restore("last", init_state(model, cfg, steps.tx))
    finally:
        ckpts.close()
    assert meta["epoch"] == 1 and meta["history"] == _metrics(run_dir)
    assert int(state.step) == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))

    # rerunning the same command refuses with the reason, and trains nothing
    monkeypatch.setattr(loop, "batches", real_batches)
    t0 = time.perf_counter()
    with pytest.raises(TrainingDiverged, match="failed before and is not retrained") as again:
        train_and_evaluate(cfg, run_dir)
    assert time.perf_counter() - t0 < 5
    assert "batch 3 of 6" in str(again.value) and str(run_dir / "failed.json") in str(again.value)
    assert _steps(run_dir, "last") == [6]

    # the documented retry: delete failed.json - the run resumes from the last good checkpoint
    (run_dir / "failed.json").unlink()
    res = train_and_evaluate(cfg, run_dir)
    assert [r["epoch"] for r in _metrics(run_dir)] == [1, 2] and res["epochs"] == 2


def test_a_diverging_learning_rate_is_reported_as_failed(synth_root, tmp_path):
    """sgd at train.lr=1e6 really diverges on the tiny config; the sweep goes on and every
    listing names the run as failed, with the reason."""
    sweep = tmp_path / "sweep"
    args = [*TINY, f"data.root={synth_root}", "head=cdl", "train.optimizer=sgd", "train.lr=1e6"]
    proc = launch("-m", *args, f"hydra.sweep.dir={sweep}", cwd=Path.cwd())
    assert proc.returncode != 0
    assert "training diverged at epoch 1, batch" in proc.stderr
    job = sweep / "cxr8-cdl" / "seed0"
    failed = read_failure(job)
    assert failed["reason"] == "non_finite" and failed["knobs"]["train.lr"] == 1e6
    assert not (job / "results.json").exists()
    assert not list((job / "checkpoints" / "last").iterdir())  # nothing after the start

    summary = (sweep / "sweep_summary.txt").read_text()
    assert "1 failed" in summary and "training diverged at epoch 1, batch" in summary
    report = (sweep / "report" / "report.md").read_text()
    assert "**failed** `cxr8-cdl/seed0`" in report and "training diverged at epoch 1" in report

    listing = subprocess.run(
        [sys.executable, "-m", "qtl.summary", str(sweep)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "failed" in listing.stdout and "training diverged at epoch 1, batch" in listing.stdout

    # the same run again, as a single job: refused at once with the reason, exit status 4
    t0 = time.perf_counter()
    again = launch(*args, f"hydra.run.dir={job}", cwd=Path.cwd())
    print(f"refusing a diverged run took {time.perf_counter() - t0:.1f} s (process included)")
    assert again.returncode == 4, again.stderr[-2000:]
    assert "failed before and is not retrained" in again.stderr
    assert "training diverged at epoch 1, batch" in again.stderr and "name=" in again.stderr
    assert "Traceback" not in again.stderr
