"""A stop signal in the middle of an epoch (SLURM preemption / time limit): the loop finishes
the step, saves `last` with its place in the epoch, hands the signal on, and the rerun
continues at the next batch - same history as a run that was never interrupted."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import TINY, compose
from helpers import read_metrics as _metrics

from qtl.apps.train import train_and_evaluate
from qtl.train.preempt import TrainingInterrupted

pytestmark = pytest.mark.slow


def test_signal_mid_epoch_checkpoints_and_resumes_at_that_batch(
    synth_root, tmp_path, monkeypatch, capsys
):
    import qtl.train.loop as loop

    cfg = compose(*TINY, f"data.root={synth_root}", "head=cdl", "train.max_epochs=3")
    straight = train_and_evaluate(cfg, tmp_path / "straight")

    real_batches = loop.batches

    def signalling(*args, **kwargs):  # the scheduler's signal arrives while batch 2 trains
        for i, b in enumerate(real_batches(*args, **kwargs)):
            if kwargs.get("epoch") == 2 and i == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
            yield b

    monkeypatch.setattr(loop, "batches", signalling)
    handed_over = []  # stands in for submitit's handler (which would requeue the job)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed_over.append(signum))
    run_dir = tmp_path / "stopped"
    try:
        with pytest.raises(TrainingInterrupted, match="epoch 2, batch 3 of 6"):
            train_and_evaluate(cfg, run_dir)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert handed_over == [signal.SIGUSR2]  # the scheduler's handler ran after the save
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]
    assert not (run_dir / "results.json").exists()

    monkeypatch.setattr(loop, "batches", real_batches)
    capsys.readouterr()
    resumed = train_and_evaluate(cfg, run_dir)
    assert "after epoch 1 and 3 batches of epoch 2 " in capsys.readouterr().out
    rows, ref = _metrics(run_dir), _metrics(tmp_path / "straight")
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # no epoch repeated or lost
    for a, b in zip(rows, ref, strict=True):
        assert a["step"] == b["step"]  # no batch repeated or lost
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
    assert resumed["auroc"]["test"]["mean"] == pytest.approx(
        straight["auroc"]["test"]["mean"], abs=1e-6
    )
