"""A run killed at any moment resumes, and a save that cannot happen stops the run at once.

Every crash window of a run's life is hit on purpose (``QTL_FAULT``, see ``qtl.utils.faults``, and
a kill inside Orbax's own save), the same command is run again, and the result is compared
with an uninterrupted twin: the same epochs (none lost or repeated), the same losses, the
same best epoch and AUROCs, and one complete step left in each checkpoint folder.

A disk that fills up, a checkpoint folder that turns read-only or vanishes: the run stops
within seconds with a message naming the folder and the cause, and the checkpoints that were
complete before stay usable - a rerun after the fix resumes from them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, compose, launch
from helpers import read_metrics as _metrics
from helpers import read_results

from qtl.apps.train import train_and_evaluate
from qtl.train.checkpoint import CheckpointSaveError
from qtl.utils import faults

pytestmark = pytest.mark.slow

ARGS = [*TINY, "head=cdl", "train.max_epochs=3"]
N = 6  # batches per epoch: 96 training images, batch 16; `last` of epoch e is step N * e


def _cfg(synth_root: Path):
    return compose(*ARGS, f"data.root={synth_root}")


def _steps(run_dir: Path, which: str) -> list[int]:
    folder = run_dir / "checkpoints" / which
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").rglob("*") if "tmp" in p.name]


def _predictions(run_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    with (run_dir / f"predictions_{split}.csv").open() as f:
        rows = list(csv.reader(f))
    head = rows[0]
    cols = [i for i, name in enumerate(head) if name.startswith("prob_")]
    return [r[0] for r in rows[1:]], np.array([[float(r[i]) for i in cols] for r in rows[1:]])


@pytest.fixture(scope="module")
def twin(synth_root, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run every crashed one is compared with."""
    run_dir = tmp_path_factory.mktemp("twin") / "run"
    results = train_and_evaluate(_cfg(synth_root), run_dir)
    improved = [r["epoch"] for r in _metrics(run_dir) if r["best"]]
    assert len(improved) >= 2, f"the windows below need two improved epochs, got {improved}"
    return run_dir, results


def _same_as_twin(run_dir: Path, twin: tuple[Path, dict]) -> None:
    twin_dir, ref = twin
    res = read_results(run_dir)
    rows, ref_rows = _metrics(run_dir), _metrics(twin_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # no epoch lost or repeated
    for a, b in zip(rows, ref_rows, strict=True):
        assert (a["step"], a["best"]) == (b["step"], b["best"])
        for key in ("train_loss", "val_loss", "val_mean_auroc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert (res["epochs"], res["best_epoch"], res["stopped"]) == (
        ref["epochs"],
        ref["best_epoch"],
        ref["stopped"],
    )
    assert res["best_val_loss"] == pytest.approx(ref["best_val_loss"], rel=1e-5)
    assert set(res["auroc"]) == set(ref["auroc"]) == {"val", "test", "external"}
    for split, block in ref["auroc"].items():
        assert res["auroc"][split]["mean"] == pytest.approx(block["mean"], abs=1e-6)
        ids, probs = _predictions(run_dir, split)
        ref_ids, ref_probs = _predictions(twin_dir, split)
        assert ids == ref_ids
        np.testing.assert_allclose(probs, ref_probs, atol=2e-6)
    # the protocol's end state: one complete step per folder, nothing half-written
    assert _steps(run_dir, "best") == [ref["best_epoch"]]
    assert _steps(run_dir, "last") == [N * 3]
    assert _leftovers(run_dir) == []


def _window_state(point: str, run_dir: Path, improved: list[int]) -> None:
    """What the crash left on disk: proof that it hit the window it names."""
    second = improved[1]  # the fault fires at the second arrival: the 2nd improved epoch
    assert not (run_dir / "results.json").exists()
    if point == "before_best_save":
        assert _steps(run_dir, "best") == [improved[0]]
        assert _steps(run_dir, "last") == [N * (second - 1)]
    elif point == "between_best_and_last":  # best is newer than the committed last
        assert _steps(run_dir, "best") == [improved[0], second]
        assert _steps(run_dir, "last") == [N * (second - 1)]
    elif point == "after_last_save":  # committed, the superseded step not yet pruned
        assert _steps(run_dir, "last") == [N, 2 * N]
    elif point == "evaluate":
        assert _steps(run_dir, "last") == [3 * N]
        assert not list(run_dir.glob("predictions_*.csv"))
    elif point == "between_predictions":
        assert [p.name for p in run_dir.glob("predictions_*.csv")] == ["predictions_val.csv"]


@pytest.mark.parametrize("point", faults.POINTS)
def test_crash_in_each_window_resumes_like_the_twin(point, twin, synth_root, tmp_path, monkeypatch):
    improved = [r["epoch"] for r in _metrics(twin[0]) if r["best"]]
    arrival = 2 if point in ("before_best_save", "between_best_and_last", "after_last_save") else 1
    monkeypatch.setenv("QTL_FAULT", f"{point}@{arrival}")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    run_dir = tmp_path / "run"
    with pytest.raises(faults.InjectedFault, match=point):
        train_and_evaluate(_cfg(synth_root), run_dir)
    _window_state(point, run_dir, improved)

    monkeypatch.delenv("QTL_FAULT")
    train_and_evaluate(_cfg(synth_root), run_dir)
    _same_as_twin(run_dir, twin)


# In a subprocess: the kill lands inside Orbax's save of `last` for epoch 2, after every file
# is written to `2N.orbax-checkpoint-tmp` and before the rename that completes it.
_KILL_INSIDE_ORBAX = f"""
import os, signal
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    final = self.get_final()
    if final.parent.name == "last" and final.name == "{2 * N}":
        os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


def _launch(*args: str, prelude: str = "", env: dict | None = None, timeout: int = 600):
    """``python launch.py <args>`` with ``prelude`` run first, in the session's workdir (its
    data and pretrained-backbone caches are the in-process runs')."""
    if not prelude:
        return launch(*args, cwd=Path.cwd(), env=env, timeout=timeout)
    code = (
        prelude
        + f"\nimport runpy, sys\nsys.argv = [{str(ROOT / 'launch.py')!r}, *{list(args)!r}]\n"
        + f"runpy.run_path({str(ROOT / 'launch.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path.cwd(),
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sigkill_inside_orbax_save_then_between_best_and_last(twin, synth_root, tmp_path):
    """Two real SIGKILLs in a row on one run directory, then the same command again."""
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.root={synth_root}", f"hydra.run.dir={run_dir}"]

    first = _launch(*args, prelude=_KILL_INSIDE_ORBAX)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last" / f"{2 * N}.orbax-checkpoint-tmp").is_dir()
    assert _steps(run_dir, "last") == [N] and 2 in _steps(run_dir, "best")  # best/2 uncommitted

    # the rerun removes the half-written step, redoes epoch 2 (replacing the uncommitted
    # best/2: Orbax's StepAlreadyExistsError before) and is killed between best and last
    # of epoch 3 (or the next improved epoch)
    improved = [r["epoch"] for r in _metrics(twin[0]) if r["best"]]
    second = _launch(*args, env={"QTL_FAULT": "between_best_and_last@2"})
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert "resuming" in second.stdout and "after epoch 1 " in second.stdout
    later = [e for e in improved if e > 2]
    if later:
        assert _steps(run_dir, "best")[-1] == later[0]
        assert _steps(run_dir, "last") == [N * (later[0] - 1)]

    train_and_evaluate(_cfg(synth_root), run_dir)  # what the same command runs (in-process)
    _same_as_twin(run_dir, twin)


def _can_mount() -> bool:
    probe = Path(f"/tmp/qtl-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0  # fmt: skip
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except OSError:
        return False
    finally:
        probe.rmdir()


@contextlib.contextmanager
def _small_disk(path: Path, size_mb: int = 16):
    """A real, small file system at ``path`` (tmpfs; needs root) - or None where none can be
    mounted, and the test injects ENOSPC at the checkpoint writer instead."""
    path.mkdir(parents=True)
    if not _can_mount():
        yield False
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# At the start of epoch 2: fill the run's disk (or make its checkpoint writes fail with
# ENOSPC where no small disk could be mounted), and say when on stderr.
_FILL_AT_EPOCH_2 = """
import errno, sys, time
from pathlib import Path
import qtl.train.loop as loop
_batches = loop.batches
def batches(*args, **kwargs):
    for i, b in enumerate(_batches(*args, **kwargs)):
        if kwargs.get("epoch") == 2 and i == 0:
            if {real}:
                try:
                    with open({filler!r}, "wb") as f:
                        while True:
                            f.write(b"\\0" * 2**20)
                except OSError:
                    pass
            else:
                import orbax.checkpoint as ocp
                def full(*a, **k):
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                ocp.CheckpointManager.save = full
            print(f"FILLED {{time.time()}}", file=sys.stderr, flush=True)
        yield b
loop.batches = batches
"""


def test_disk_full_fails_fast_and_rerun_resumes(twin, synth_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    with _small_disk(disk) as real:
        run_dir = disk / "run"
        filler = disk / "filler"
        args = [*ARGS, f"data.root={synth_root}", f"hydra.run.dir={run_dir}"]
        proc = _launch(*args, prelude=_FILL_AT_EPOCH_2.format(real=real, filler=str(filler)))
        ended = time.time()
        filled = float(proc.stderr.split("FILLED ")[1].split()[0])
        print(f"disk full (real={real}): the run exited {ended - filled:.2f} s after the fill")
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert ended - filled < 30  # the rest of epoch 2, its validation and the failed save
        assert "Traceback" not in proc.stderr
        message = proc.stderr.split("qtl: CheckpointSaveError: ")[1]
        assert str(run_dir / "checkpoints" / "best") in message  # epoch 2 improved: best first
        assert "the disk is full" in message and "rerun the same command" in message
        # what was complete before the failure is intact and is where the rerun starts
        assert _steps(run_dir, "last") == [N] and _steps(run_dir, "best") == [1]
        assert [r["epoch"] for r in _metrics(run_dir)] == [1]

        filler.unlink(missing_ok=True)
        capsys.readouterr()
        train_and_evaluate(_cfg(synth_root), run_dir)  # the same command, in-process
        assert "after epoch 1 " in capsys.readouterr().out
        _same_as_twin(run_dir, twin)


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make ``folder`` read-only for real: by its permission bits where they bind (not root),
    else by a read-only bind mount (root ignores the bits)."""
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
    for p in modes:
        p.chmod(0o555)
    probe = folder / ".write-probe"
    try:
        probe.touch()
    except PermissionError:
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    probe.unlink()
    for p, mode in modes.items():
        p.chmod(mode)
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make {folder} read-only: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("breakage", ["read_only", "vanished"])
def test_unwritable_checkpoint_folder_fails_fast(breakage, twin, synth_root, tmp_path, monkeypatch):
    import qtl.train.checkpoint as checkpoint
    import qtl.train.loop as loop

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    stack = contextlib.ExitStack()
    broken: list[float] = []
    real_batches, real_save = loop.batches, checkpoint.Checkpoints.save

    def breaking(*args, **kwargs):  # at the start of epoch 2
        for i, b in enumerate(real_batches(*args, **kwargs)):
            if kwargs.get("epoch") == 2 and i == 0:
                if breakage == "read_only":
                    stack.enter_context(_read_only(folder))
                else:
                    shutil.rmtree(folder)
                broken.append(time.perf_counter())
            yield b

    save_seconds: list[float] = []

    def timed_save(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_save(self, *args, **kwargs)
        finally:
            save_seconds.append(time.perf_counter() - t0)

    monkeypatch.setattr(loop, "batches", breaking)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", timed_save)
    with stack, pytest.raises(CheckpointSaveError) as err:
        train_and_evaluate(_cfg(synth_root), run_dir)
    stopped = time.perf_counter() - broken[0]
    print(f"{breakage}: failed save took {save_seconds[-1]:.3f} s; stopped {stopped:.2f} s later")
    assert save_seconds[-1] < 5 and stopped < 30
    message = str(err.value)
    assert str(folder / "best") in message
    causes = ("read-only", "permission denied") if breakage == "read_only" else ("vanished",)
    assert any(c in message for c in causes) and "rerun the same command" in message

    monkeypatch.setattr(loop, "batches", real_batches)
    if breakage == "read_only":  # the fixed folder still holds epoch 1: the rerun resumes
        assert _steps(run_dir, "last") == [N] and _steps(run_dir, "best") == [1]
    train_and_evaluate(_cfg(synth_root), run_dir)
    _same_as_twin(run_dir, twin)


def test_kill_while_pruning_leaves_a_resumable_folder(tmp_path):
    """A step half-deleted by a kill during `prune` is older than the commit: never restored,
    removed by the next prune."""
    import jax.numpy as jnp

    from qtl.train.checkpoint import Checkpoints

    state = {"w": jnp.arange(4.0)}
    ckpts = Checkpoints(tmp_path / "ck")
    ckpts.save("last", N, state, {"epoch": 1})
    ckpts.save("last", 2 * N, {"w": state["w"] + 1}, {"epoch": 2})
    ckpts.close()
    half = tmp_path / "ck" / "last" / str(N)
    shutil.rmtree(half / "state")  # what rmtree had done when the kill came
    ckpts = Checkpoints(tmp_path / "ck")
    try:
        assert ckpts.latest_epoch("last") == 2 * N
        restored, meta = ckpts.restore("last", state)
        assert meta == {"epoch": 2} and np.asarray(restored["w"]).tolist() == [1, 2, 3, 4]
        ckpts.prune(last=2 * N, best=None)
        assert ckpts.steps("last") == [2 * N] and not half.exists()
    finally:
        ckpts.close()


def test_fault_point_names_are_checked(monkeypatch):
    monkeypatch.setenv("QTL_FAULT", "between_best_and_lats")
    with pytest.raises(ValueError, match="between_best_and_last"):
        faults.point("before_best_save")
