"""Damaged checkpoints fall back, loudly: the newest intact state is resumed, every damaged
step is named and moved aside (never deleted), and the run finishes exactly like the
uninterrupted twin of ``test_crash``. With nothing intact: one line, exit 2.

The damage is done to real Orbax checkpoints of a tiny run: bytes of the arrays' data files,
the JSON metadata, whole step folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import read_metrics as _metrics
from test_crash import ARGS, N, _cfg, _launch, _same_as_twin, _steps

from qtl.apps.train import train_and_evaluate
from qtl.train.checkpoint import CheckpointError
from qtl.utils import faults
from qtl.utils.errors import QtlUserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twin(synth_root, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run (as in test_crash) each resumed one must equal."""
    run_dir = tmp_path_factory.mktemp("twin") / "run"
    return run_dir, train_and_evaluate(_cfg(synth_root), run_dir)


def _interrupted(synth_root: Path, run_dir: Path, monkeypatch) -> None:
    """A run killed right after committing `last` of epoch 2, before pruning: two committed
    `last` steps (N, 2N) and the best epoch's step are on disk."""
    monkeypatch.setenv("QTL_FAULT", "after_last_save@2")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        train_and_evaluate(_cfg(synth_root), run_dir)
    monkeypatch.delenv("QTL_FAULT")
    assert _steps(run_dir, "last") == [N, 2 * N]


def _files(step_dir: Path, kind: str) -> list[Path]:
    """The arrays' data files (``state/``) or the JSON metadata files (``meta/``) of a step."""
    found = [p for p in (step_dir / kind).rglob("*") if p.is_file()]
    assert found, f"no {kind} files in {step_dir}"
    return found


def _damage_data(step_dir: Path) -> None:
    """Bit rot in every data file of the arrays: their middle bytes flipped."""
    for path in _files(step_dir, "state"):
        if path.stat().st_size < 64 or "METADATA" in path.name or path.suffix == ".json":
            continue
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
        path.write_bytes(bytes(data))


def _damage_meta(step_dir: Path) -> None:
    """The bookkeeping cut short, as a copy that stopped half-way leaves it."""
    for path in _files(step_dir, "meta"):
        text = path.read_bytes()
        path.write_bytes(text[: len(text) // 2])


def _wipe(step_dir: Path) -> None:
    """The whole step folder emptied (a sync that created it and copied nothing)."""
    for path in sorted(step_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()


def _resume(synth_root: Path, run_dir: Path, capfd) -> str:
    capfd.readouterr()
    train_and_evaluate(_cfg(synth_root), run_dir)
    out, err = capfd.readouterr()
    return out + err


def test_damaged_newest_step_falls_back_to_the_older_committed_one(
    twin, synth_root, tmp_path, monkeypatch, capfd
):
    run_dir = tmp_path / "run"
    _interrupted(synth_root, run_dir, monkeypatch)
    ckpt = run_dir / "checkpoints"
    _damage_data(ckpt / "last" / str(2 * N))

    said = _resume(synth_root, run_dir, capfd)
    assert f"checkpoint {ckpt / 'last' / str(2 * N)} is damaged" in said
    assert f"resuming from last/{N}" in said and "after epoch 1 " in said
    # kept for a look, out of Orbax's view; the run finished like the uninterrupted twin
    assert (ckpt / "damaged" / f"last-{2 * N}" / "state").is_dir()
    _same_as_twin(run_dir, twin)


def test_damaged_metadata_of_every_last_step_falls_back_to_best(
    twin, synth_root, tmp_path, monkeypatch, capfd
):
    run_dir = tmp_path / "run"
    _interrupted(synth_root, run_dir, monkeypatch)
    ckpt = run_dir / "checkpoints"
    best = _steps(run_dir, "best")[-1]
    for step in (N, 2 * N):
        _damage_meta(ckpt / "last" / str(step))

    said = _resume(synth_root, run_dir, capfd)
    for step in (N, 2 * N):
        assert f"checkpoint {ckpt / 'last' / str(step)} is damaged" in said
        assert (ckpt / "damaged" / f"last-{step}").is_dir()
    assert f"resuming from best/{best}" in said and f"after epoch {best} " in said
    _same_as_twin(run_dir, twin)


def test_nothing_intact_is_one_line_and_exit_2(twin, synth_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _interrupted(synth_root, run_dir, monkeypatch)
    ckpt = run_dir / "checkpoints"
    _wipe(ckpt / "last" / str(2 * N))  # an empty step folder
    _damage_data(ckpt / "last" / str(N))
    bests = _steps(run_dir, "best")
    for step in bests:
        _damage_meta(ckpt / "best" / str(step))
    rows = _metrics(run_dir)

    with pytest.raises(CheckpointError) as err:  # in process: what it raises
        train_and_evaluate(_cfg(synth_root), run_dir)
    assert isinstance(err.value, QtlUserError)
    assert f"no intact checkpoint in {ckpt}" in str(err.value)
    assert f"delete {ckpt}" in str(err.value)
    moved = sorted(p.name for p in (ckpt / "damaged").iterdir())
    assert moved == sorted([f"last-{N}", f"last-{2 * N}"] + [f"best-{s}" for s in bests])
    assert _metrics(run_dir) == rows  # the finished epochs' record stays

    # a rerun that found nothing: what the user sees (a fresh damage, as a real process)
    run2 = tmp_path / "run2"
    _interrupted(synth_root, run2, monkeypatch)
    for which in ("last", "best"):
        for step in _steps(run2, which):
            _damage_data(run2 / "checkpoints" / which / str(step))
    got = _launch(*ARGS, f"data.root={synth_root}", f"hydra.run.dir={run2}")
    assert got.returncode == 2, got.stderr[-2000:]
    assert "Traceback" not in got.stderr, got.stderr
    lines = [x for x in got.stderr.splitlines() if x.strip() and "warning:" not in x]
    assert len(lines) == 1 and "no intact checkpoint" in lines[0], got.stderr


def test_a_damaged_best_at_evaluation_is_moved_aside_and_refused(
    twin, synth_root, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("QTL_FAULT", "evaluate")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        train_and_evaluate(_cfg(synth_root), run_dir)
    monkeypatch.delenv("QTL_FAULT")
    best = _steps(run_dir, "best")[-1]
    _damage_data(run_dir / "checkpoints" / "best" / str(best))
    with pytest.raises(CheckpointError, match=f"'best' checkpoint of epoch {best} .* damaged"):
        train_and_evaluate(_cfg(synth_root), run_dir)
    assert (run_dir / "checkpoints" / "damaged" / f"best-{best}").is_dir()
    assert not (run_dir / "results.json").exists()
    assert os.path.exists(run_dir / "metrics.jsonl")


def test_a_closed_event_loop_after_a_failed_restore_prints_nothing(capsys):
    """Orbax's callbacks that arrive after a failed restore closed its loop are dropped; any
    other unraisable exception is still printed by Python's hook."""
    import sys

    from qtl.runtime import _quiet_closed_loop

    class Raises:  # an exception raised where no one can catch it: Python's unraisable hook
        def __init__(self, exc: BaseException):
            self.exc = exc

        def __del__(self):
            raise self.exc

    got: list = []
    old, sys.unraisablehook = sys.unraisablehook, got.append
    try:
        Raises(RuntimeError("Event loop is closed"))
        Raises(RuntimeError("something else"))
    finally:
        sys.unraisablehook = old
    assert len(got) == 2
    _quiet_closed_loop(got[0])
    assert capsys.readouterr().err == ""
    _quiet_closed_loop(got[1])
    assert "something else" in capsys.readouterr().err
