"""The real thing: a single-node SLURM cluster (scripts/slurm-local.sh, with accounting and
fake GPUs), the grid submitted through ``hydra/launcher=slurm``, a rerun that trains nothing,
and a job preempted by SLURM's signal that checkpoints, is requeued and resumes.

Needs root (the script installs Debian's SLURM packages when missing and starts the
daemons); skipped with the reason otherwise. The cluster comes up once per module and is
stopped at the end unless it was already running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LARGE_SIZES, ROOT, TINY, launch
from helpers import read_metrics as _metrics
from helpers import read_results

from qtl.record.wandb_file import read_run_file

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
# small SLURM jobs: the node has 2 cores; each job asks for one core and one (fake) GPU
SMALL_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.gpus_per_node=1",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (installs packages, starts daemons)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no SLURM installed and no apt-get to install it")
    was_up = subprocess.run([SCRIPT, "status"], capture_output=True).returncode == 0
    if not was_up:
        up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=900)
        if up.returncode != 0 and "apt-get failed" in up.stderr:
            pytest.skip(f"SLURM packages could not be installed: {up.stderr.strip()}")
        assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not was_up:
        subprocess.run([SCRIPT, "down"], capture_output=True, timeout=300)


@pytest.fixture
def workdir(_session_workdir) -> Path:
    """The session's scratch folder: jobs reuse the pretrained backbone cached there."""
    return _session_workdir


def _sacct(job_id: str, fields: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-D", "-o", fields],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def _final_rows(job_id: str, fields: str) -> list[list[str]]:
    """One accounting row per run of the job (a requeue adds one), once the last has ended
    (the job hands its result over a moment before SLURM records the end)."""
    for _ in range(150):
        rows = [line.split("|") for line in _sacct(job_id, fields)]
        if rows[-1][0] not in ("RUNNING", "COMPLETING"):
            break
        time.sleep(0.2)
    return rows


def _records(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]


def test_database_password_is_generated_at_up(slurm_cluster):
    """No password ships with the script: `up` generates one (0600 files) and the database
    accepts that one, not the one an older script shipped; a second `up` keeps it."""
    state = Path(os.environ.get("QTL_SLURM_DIR", "/tmp/qtl-slurm"))
    pass_file, conf = state / "slurmdbd.pass", Path("/etc/slurm/slurmdbd.conf")
    password = pass_file.read_text()
    assert re.fullmatch("[0-9a-f]{48}", password), "not a generated password"
    assert password not in SCRIPT.read_text() and "qtl-local" not in SCRIPT.read_text()
    for f in (pass_file, conf):
        assert f.stat().st_mode & 0o777 == 0o600 and f.stat().st_uid == 0, f
    assert f"StoragePass={password}\n" in conf.read_text()

    def login(pw: str) -> int:
        cmd = ["mariadb", "--socket=/run/mysqld/mysqld.sock", "-u", "slurm", "-e", "select 1"]
        env = {**os.environ, "MYSQL_PWD": pw}
        return subprocess.run(cmd, env=env, capture_output=True).returncode

    assert login(password) == 0 and login("qtl-local") != 0
    up = subprocess.run([SCRIPT, "up"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert pass_file.read_text() == password and password not in up.stdout + up.stderr
    clusters = subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert clusters.returncode == 0 and "qtl" in clusters.stdout.split(), clusters.stderr


def test_grid_on_slurm_then_rerun_trains_nothing(slurm_cluster, workdir, synth_root):
    args = [
        "-m",
        *TINY,
        f"data.root={synth_root}",
        "train.max_epochs=1",
        "hydra.sweep.dir=multirun/slurm-grid",
        "head=cdl,dqc",
        "seed=0,1",
        *SMALL_JOBS,
    ]
    proc = launch(*args, cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = workdir / "multirun" / "slurm-grid"
    for head in ("cdl", "dqc"):
        for seed in (0, 1):
            res = read_results(sweep / f"cxr8-{head}" / f"seed{seed}")
            assert (res["head"], res["seed"], res["epochs"]) == (head, seed, 1)
            assert 0.0 <= res["auroc"]["test"]["mean"] <= 1.0
    records = _records(sweep)
    assert [r["state"] for r in records] == ["finished"] * 4
    for r in records:  # each run was a SLURM job that got its own (fake) GPU
        [[state, tres]] = _final_rows(r["slurm_job_id"], "State,AllocTRES")
        assert state == "COMPLETED" and "gres/gpu=1" in tres, (state, tres)
    assert "4 job(s): 4 finished" in proc.stdout
    trained_at = {p: p.stat().st_mtime for p in sweep.rglob("metrics.jsonl")}

    again = launch(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 skipped - every run had finished already, nothing was trained" in again.stdout
    assert [r["state"] for r in _records(sweep)] == ["skipped"] * 4
    assert {p: p.stat().st_mtime for p in sweep.rglob("metrics.jsonl")} == trained_at
    logs = [p.read_text() for p in (sweep / ".submitit").rglob("*_log.out")]
    assert sum("finished already (results.json) - nothing to train" in x for x in logs) >= 4


def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster, workdir, synth_root_large
):
    """SIGUSR2 from SLURM (as before a time limit or on preemption) in the middle of an
    epoch: checkpoint, `scontrol requeue` by submitit, resume at the next batch with the
    same W&B run - and the history equals an uninterrupted twin's."""
    args = [
        "-m", *TINY, f"data.root={synth_root_large}", LARGE_SIZES, "data.limit=400",
        "train.batch_size=2", "train.max_epochs=2", "head=cdl", "logger=wandb",
        "name=preempted,twin", "hydra.sweep.dir=multirun/slurm-preempt/${name}", *SMALL_JOBS,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = workdir / "multirun" / "slurm-preempt"  # the sweep's own folder is base/debug
    run_dir = base / "preempted" / "cxr8-cdl" / "seed0"
    record = base / "debug" / ".sweep_jobs" / "00000.json"
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text():
            break  # epoch 1 is done; epoch 2 has 200 steps to go
        time.sleep(0.05)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    job_id = json.loads(record.read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    out, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, out[-4000:]

    # SLURM ran the job twice under the same id: requeued once, then completed
    assert _final_rows(job_id, "State") == [["REQUEUED"], ["COMPLETED"]]
    submitit_dir = base / "debug" / ".submitit"
    logs = "".join(p.read_text() for p in submitit_dir.rglob("*_0_log.*"))
    assert "checkpoint saved (epoch 2, batch " in logs and "Requeued job" in logs
    assert "after epoch 1 and " in logs and " batches of epoch 2 " in logs
    states = {r["num"]: r for r in _records(base / "debug")}
    assert states[0]["state"] == "resumed" and states[0]["slurm_restarts"] == 1
    assert states[1]["state"] == "finished"

    rows = _metrics(run_dir)
    twin = _metrics(base / "twin" / "cxr8-cdl" / "seed0")
    assert [r["epoch"] for r in rows] == [1, 2]  # no repeated or lost epoch
    for a, b in zip(rows, twin, strict=True):
        assert a["step"] == b["step"]  # no repeated or lost batch
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)

    # the same W&B run continued: two offline segments with the id kept in the run dir
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    segments = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(segments) == 2
    assert {read_run_file(p)["run"]["id"] for p in segments} == {run_id}


def test_a_stopped_sweep_cancels_its_slurm_jobs_and_the_rerun_resumes(
    slurm_cluster, workdir, synth_root
):
    """SIGTERM to the sweep while its jobs train: every job is cancelled (scancel: SIGTERM,
    a checkpoint), none keeps running, and the same command resumes both to the end."""
    args = [
        "-m", *TINY, f"data.root={synth_root}", "train.max_epochs=25", "train.patience=25",
        "head=cdl", "seed=0,1", "hydra.sweep.dir=multirun/slurm-stopped", "report.auto=false",
        *SMALL_JOBS,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = workdir / "multirun" / "slurm-stopped"
    runs = [sweep / "cxr8-cdl" / f"seed{s}" for s in (0, 1)]
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while not all((r / "metrics.jsonl").exists() for r in runs):
        assert driver.poll() is None and time.time() < deadline, driver.stdout.read()[-3000:]
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode != 0
    found = re.search(r"cancelled 2 job\(s\) \(([^)]*)\)", out)
    assert found, out[-3000:]
    ids = found.group(1).split(", ")
    for _ in range(300):  # SLURM ends them (SIGTERM, then SIGKILL after KillWait)
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(ids)],
                                capture_output=True, text=True).stdout  # fmt: skip
        if not queued.strip():
            break
        time.sleep(0.5)
    assert not queued.strip(), queued
    for job in ids:
        assert _final_rows(job, "State")[-1][0].startswith("CANCELLED")
    assert not any((r / "results.json").exists() for r in runs)

    again = launch(*args, cwd=workdir, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for run in runs:
        assert [r["epoch"] for r in _metrics(run)] == list(range(1, 26))


def _task_pid(sweep: Path, rank: int) -> int | None:
    """The pid of SLURM task ``rank``'s Python process of a job of this sweep (submitit
    starts ``python -m submitit.core._submit <sweep>/.submitit/<job>`` under srun)."""
    marker, rank_var = str(sweep).encode(), f"SLURM_PROCID={rank}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"python" not in Path(argv[0].decode(errors="replace")).name.encode():
            continue
        if b"submitit.core._submit" in argv and any(marker in a for a in argv) and rank_var in env:
            return int(proc.name)
    return None


def test_a_two_task_run_survives_a_killed_task_by_requeue_and_equals_one_process(
    slurm_cluster, workdir, synth_root_large
):
    """train.processes=2: SLURM starts two tasks (tasks_per_node follows train.processes),
    JAX joins them from SLURM's environment. Task 1 is killed (SIGKILL) in epoch 2; task 0
    stops at its next collective and requeues the job; both tasks restart, resume after
    epoch 1 and finish the run a single process trains (tolerance: tests/test_processes.py)."""
    data = [
        *TINY, f"data.root={synth_root_large}", "head=cdl", "train.max_epochs=2",
        LARGE_SIZES, "data.limit=400",
        "train.batch_size=4",
    ]  # fmt: skip
    twin = workdir / "multirun" / "slurm-two-tasks-twin"
    proc = launch(*data, f"hydra.run.dir={twin}", cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sweep = workdir / "multirun" / "slurm-two-tasks"
    args = [
        "-m", *data, "train.processes=2", "name=twotasks", f"hydra.sweep.dir={sweep}",
        "report.auto=false", *SMALL_JOBS,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run_dir = sweep / "cxr8-cdl" / "seed0"
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text():
            break  # epoch 1 is committed; epoch 2 has 100 steps to go
        time.sleep(0.05)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    job_id = json.loads((sweep / ".sweep_jobs" / "00000.json").read_text())["slurm_job_id"]
    pid = _task_pid(sweep, 1)
    assert pid is not None, "task 1 of the job not found"
    os.kill(pid, signal.SIGKILL)
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out[-4000:]

    rows = _final_rows(job_id, "State,AllocTRES")
    assert [r[0] for r in rows] == ["REQUEUED", "COMPLETED"], rows
    assert "cpu=2" in rows[-1][1], rows  # two tasks of one core each
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "qtl: process 0 of 2 stops:" in logs
    assert "requeued: all its tasks restart and resume" in logs
    assert logs.count(f"resuming {run_dir} after epoch 1") == 2, logs[-3000:]  # both tasks
    mine, theirs = _metrics(run_dir), _metrics(twin)
    assert [r["epoch"] for r in mine] == [1, 2]
    for a, b in zip(mine, theirs, strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "val_mean_auroc"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    res = read_results(run_dir)
    assert res["auroc"]["test"]["mean"] == pytest.approx(
        read_results(twin)["auroc"]["test"]["mean"], abs=1e-5
    )
