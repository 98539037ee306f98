"""A killed sweep stops the jobs it started, and rerunning the same command resumes them.

On the workstation pool: SIGTERM to the launcher (SIGINT and SIGHUP take the same path) makes it
stop its jobs (each checkpoints first); a launcher killed outright (SIGKILL: nothing of it
runs) still takes its jobs with it, as the kernel sends them SIGTERM when it dies. With the
submitit launchers (SLURM), a stopped sweep cancels the jobs it submitted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY
from helpers import launch, read_metrics

pytestmark = pytest.mark.slow

EPOCHS = 25  # long enough that no run ends while the test stops the sweep


def _args(sweep: Path, synth_root: Path) -> list[str]:
    return [
        "-m",
        *TINY,
        "head=cdl",
        f"train.max_epochs={EPOCHS}",
        f"train.patience={EPOCHS}",
        f"data.root={synth_root}",
        "hydra/launcher=workstation",
        "hydra.launcher.gpus=[]",
        "hydra.launcher.cpu_jobs=2",
        "hydra.launcher.stop_grace_s=120",
        f"hydra.sweep.dir={sweep}",
        "report.auto=false",
        "seed=0,1",
    ]


def _alive(*markers: bytes) -> list[int]:
    """Pids of running processes whose command line holds every one of ``markers``."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if all(m in cmdline for m in markers):
            alive.append(int(proc.name))
    return alive


def _jobs_alive(sweep: Path) -> list[int]:
    """Pids of processes running one of this sweep's pool jobs."""
    return _alive(str(sweep / ".gpu_pool").encode(), b"_worker")


def _logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in (sweep / ".gpu_pool").glob("job*.log"))


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/*/run_config.json"))  # <task-head>/<seed>


def _start(sweep: Path, synth_root: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *_args(sweep, synth_root)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _epochs(run: Path) -> int:
    return len(read_metrics(run)) if (run / "metrics.jsonl").exists() else 0


def _when_both_trained(
    sweep: Path, proc: subprocess.Popen, before: dict[Path, int] | None = None
) -> None:
    """Wait until both runs committed an epoch more than ``before`` (and are still going)."""
    deadline = time.time() + 400
    while True:
        assert proc.poll() is None, "the sweep ended before it was stopped"
        assert time.time() < deadline, "the runs did not get going"
        dirs = _run_dirs(sweep)
        if len(dirs) == 2 and all(_epochs(d) > (before or {}).get(d, 0) for d in dirs):
            return
        time.sleep(0.2)


def _stopped(sweep: Path, within: float) -> None:
    deadline = time.time() + within
    while _jobs_alive(sweep):
        assert time.time() < deadline, f"jobs still running: {_jobs_alive(sweep)}"
        time.sleep(0.2)
    for run in _run_dirs(sweep):
        assert not (run / "results.json").exists()  # stopped before the end, not finished
        assert (run / "checkpoints" / "last").is_dir()


def test_a_killed_pool_sweep_stops_its_jobs_and_the_rerun_resumes_them(synth_root, tmp_path):
    sweep = tmp_path / "sweep"
    procs: list[subprocess.Popen] = []
    try:
        # SIGTERM to the launcher: it stops its jobs (they checkpoint) and leaves
        first = _start(sweep, synth_root, tmp_path)
        procs.append(first)
        _when_both_trained(sweep, first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=200) != 0
        _stopped(sweep, within=5)  # gone with the launcher, not orphaned
        at_first = {d: len(read_metrics(d)) for d in _run_dirs(sweep)}
        assert all(n < EPOCHS for n in at_first.values())

        # the rerun resumes them; SIGKILL to the launcher this time: the kernel stops the jobs
        second = _start(sweep, synth_root, tmp_path)
        procs.append(second)
        _when_both_trained(sweep, second, at_first)
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=60)
        _stopped(sweep, within=120)
        assert _logs(sweep).count("resuming") == 2  # each job log is the latest launch's

        # and the third run finishes both, every epoch once
        third = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), *_args(sweep, synth_root)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert third.returncode == 0, third.stderr[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in _jobs_alive(sweep):
            os.kill(pid, signal.SIGKILL)
    assert _logs(sweep).count("resuming") == 2
    for run in _run_dirs(sweep):
        assert (run / "results.json").exists()
        assert [r["epoch"] for r in read_metrics(run)] == list(range(1, EPOCHS + 1))


def _submitit_alive(sweep: Path) -> list[int]:
    """Pids of processes running one of this sweep's submitit jobs."""
    return _alive(str(sweep / ".submitit").encode())


def test_a_stopped_submitit_sweep_cancels_its_jobs_and_the_rerun_resumes(synth_root, tmp_path):
    """The SLURM launcher's stop, on submitit's local executor (same launcher code; the local
    executor's cancel is SIGINT where SLURM's scancel sends SIGTERM)."""
    sweep = tmp_path / "sweep"
    pool = [a for a in _args(sweep, synth_root) if not a.startswith("hydra.launcher.")]
    args = [
        *[a for a in pool if a != "hydra/launcher=workstation"],
        "hydra/launcher=submitit_local",
        "hydra.launcher._target_=hydra_plugins.qtl_launchers.submitit_stop.QtlLocalLauncher",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # debug=tiny's backbone is pretrained once per cache folder, by whichever job gets there
    # first while the other waits, so the jobs would start training ~30 s apart: long enough
    # for one run to end before the other has trained an epoch. One run here fills the cache.
    warm = launch(*TINY, "head=cdl", "train.max_epochs=1", f"data.root={synth_root}",
                  "hydra.run.dir=warm", cwd=tmp_path)  # fmt: skip
    assert warm.returncode == 0, warm.stderr[-3000:]
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _when_both_trained(sweep, first)
        # on a loaded machine one job can still start long after the other: a run done by
        # now has nothing to stop, and the others are checked
        done = {run for run in _run_dirs(sweep) if (run / "results.json").exists()}
        assert len(done) < 2, "both runs finished before the sweep could be stopped"
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=200)
        assert first.returncode != 0
        assert "sweep stopped: cancelled" in out, out[-3000:]
        deadline = time.time() + 60
        while _submitit_alive(sweep):
            assert time.time() < deadline, f"jobs still running: {_submitit_alive(sweep)}"
            time.sleep(0.2)
        stopped = [run for run in _run_dirs(sweep) if run not in done]
        for run in stopped:
            assert not (run / "results.json").exists()  # stopped before the end
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for pid in _submitit_alive(sweep):
            os.kill(pid, signal.SIGKILL)
    again = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("resuming") >= len(stopped)
    for run in _run_dirs(sweep):
        assert [r["epoch"] for r in read_metrics(run)] == list(range(1, EPOCHS + 1))
