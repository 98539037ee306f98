"""One process per run directory: a second one refuses (or waits), a dead holder never blocks.

Real processes hold the lock; holders on "another node" are lock files as such a node writes
them (a host name that is not ours, touched at a chosen time).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, launch

from qtl.utils import runlock
from qtl.utils.runlock import LOCK_NAME, STALE_S, RunBusy, RunLock, hold_run_dir

_HOLD = """
import sys, time
from qtl.utils.runlock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(run_dir: Path, seconds: float = 120) -> subprocess.Popen:
    """Another process holding ``run_dir``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir), str(seconds)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _plant(run_dir: Path, *, host: str, pid: int, age: float, **extra) -> Path:
    """A lock file as a holder on ``host`` wrote it, last touched ``age`` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    since = time.time() - age - 3600
    path.write_text(json.dumps({"host": host, "pid": pid, "since": since, "token": "t", **extra}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_holder_in_another_process_is_named_and_a_killed_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunBusy) as busy:
            RunLock(run_dir).acquire()
        message = str(busy.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()}, pid {proc.pid}, since " in message
        assert "train.wait_for_lock=true" in message
    finally:
        proc.kill()
        proc.wait()
    with hold_run_dir(run_dir) as lock:  # pid gone: the dead holder does not block
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.me.pid == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()  # released on leaving


def test_waiting_for_a_live_holder_takes_the_lock_when_it_ends(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runlock, "POLL_S", 0.1)
    run_dir = tmp_path / "run"
    proc = _holder(run_dir, seconds=1.5)
    t0 = time.monotonic()
    with hold_run_dir(run_dir, wait=True):
        waited = time.monotonic() - t0
    proc.wait()
    assert waited > 0.5  # it waited for the holder rather than taking its lock
    assert f"waiting for host {socket.gethostname()}, pid {proc.pid}" in capsys.readouterr().out


def test_holders_on_other_nodes_count_while_their_heartbeat_is_fresh(tmp_path):
    run_dir = tmp_path / "run"
    _plant(run_dir, host="node-elsewhere", pid=os.getpid(), age=5)  # a pid that is alive here
    with pytest.raises(RunBusy, match="host node-elsewhere, pid"):
        RunLock(run_dir).acquire()
    _plant(run_dir, host="node-elsewhere", pid=os.getpid(), age=STALE_S + 5)
    with hold_run_dir(run_dir):  # its node stopped touching the file: dead
        assert json.loads((run_dir / LOCK_NAME).read_text())["host"] == socket.gethostname()


def test_a_reused_pid_a_rebooted_host_and_an_unreadable_file_do_not_block(tmp_path):
    me = RunLock(tmp_path)
    cases = {
        "reused pid": {"boot": me.me.boot, "started": "1"},  # our pid, another start time
        "rebooted": {"boot": "another-boot", "started": me.me.started},
    }
    for name, extra in cases.items():
        run_dir = tmp_path / name
        _plant(run_dir, host=socket.gethostname(), pid=os.getpid(), age=0, **extra)
        with hold_run_dir(run_dir):
            pass
    run_dir = tmp_path / "garbled"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text("{not json")
    with hold_run_dir(run_dir):
        pass
    # the control: the same file naming this very process is a live holder
    run_dir = tmp_path / "live"
    _plant(run_dir, host=socket.gethostname(), pid=os.getpid(), age=0, boot=me.me.boot,
           started=me.me.started)  # fmt: skip
    with pytest.raises(RunBusy):
        RunLock(run_dir).acquire()


def test_breaking_a_dead_lock_never_removes_a_fresh_one(tmp_path):
    """Two processes saw the same dead holder; the first broke it and took the lock. The
    second's break must leave the first's fresh lock in place."""
    run_dir = tmp_path / "run"
    stale = runlock.Holder(host="node-gone", pid=1, since=0.0, token="dead")
    with hold_run_dir(run_dir) as first:
        RunLock(run_dir)._break(stale)  # the late breaker
        assert runlock.read_holder(run_dir / LOCK_NAME)[0].token == first.me.token
    assert sorted(p.name for p in run_dir.iterdir()) == []


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file qtl keeps in a run directory, with its size and mtime (Hydra's own
    .hydra/ and the job log are rewritten by Hydra before qtl runs)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


@pytest.mark.slow
def test_two_launches_of_one_run(synth_root, tmp_path):
    """A second ``launch.py`` on a run in progress exits 2 naming the first and changes
    nothing; one that waits takes over when the first is killed, resumes and finishes."""
    run_dir = tmp_path / "run"
    args = [*TINY, "head=cdl", "train.max_epochs=3", f"data.root={synth_root}",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    waiter = None
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists():  # one epoch committed
            assert first.poll() is None and time.time() < deadline, "first run ended early"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # frozen: it holds the lock and writes nothing
        before = _files(run_dir)
        second = launch(*args, cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, second.stderr
        assert "Traceback" not in second.stderr
        host = socket.gethostname()
        assert f"in use by another process (host {host}, pid {first.pid}, since " in lines[0]
        assert str(run_dir) in lines[0]
        assert _files(run_dir) == before  # nothing of the first's touched

        log = tmp_path / "waiter.log"
        with log.open("w") as out:
            waiter = subprocess.Popen(
                [sys.executable, str(ROOT / "launch.py"), *args, "train.wait_for_lock=true"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        while "waiting for" not in log.read_text():
            assert waiter.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies (a lost node, kill -9)
        first.wait()
        assert waiter.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for proc in (first, waiter):
            if proc is not None and proc.poll() is None:
                if proc is first:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait()
    text = log.read_text()
    assert "is gone; taking it over" in text and "resuming" in text
    assert (run_dir / "results.json").exists()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_stop_signal_frees_the_run_before_the_process_ends(tmp_path):
    """A preempted run leaves by its signal's default action (no ``finally`` runs): the lock
    is released first, so a requeued job on another node need not wait for a stale heartbeat."""
    code = (
        "import os, signal, sys\n"
        "from qtl.train.preempt import StopRequest\n"
        "from qtl.utils.runlock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    stop.hand_over('test')\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=env, capture_output=True)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert not (run_dir / LOCK_NAME).exists()
