"""One run as several processes (``train.processes``): started by hand, two local processes
on a free port, each with one CPU device; gloo carries the collectives.

Tolerance: as for several devices in one process (tests/test_devices.py) - the global-batch
means are sums of per-process partial sums, so float32 additions happen in another order;
the differences seen are ~2e-8, compared to 1e-5.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY, launch
from test_devices import _assert_same_run

from qtl.utils.distributed import DistributedError, plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    env.pop("XLA_FLAGS", None)  # one device per process
    return env


def _processes(run_dir: Path, *extra: str, env: dict[int, dict[str, str]] | None = None):
    """Start ``launch.py`` as the two processes of one run; their (exit status, output)."""
    port = _free_port()
    logs = [run_dir.parent / f"{run_dir.name}.process{i}.log" for i in (0, 1)]
    outs = [log.open("w") for log in logs]  # files, not pipes: a full pipe would stall one
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "launch.py"),
                f"hydra.run.dir={run_dir}",
                "train.processes=2",
                f"train.coordinator=127.0.0.1:{port}",
                f"train.process_id={i}",
                "train.coordinator_timeout_s=120",
                *extra,
            ],
            cwd=Path.cwd(),
            env=_env((env or {}).get(i)),
            stdout=outs[i],
            stderr=subprocess.STDOUT,
        )
        for i in (0, 1)
    ]
    codes = [p.wait(timeout=900) for p in procs]
    for out in outs:
        out.close()
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def _tc(**kw):
    base = {"processes": 2, "coordinator": None, "process_id": None}
    return SimpleNamespace(**(base | kw))


def test_the_processes_of_a_run_are_resolved_or_refused_naming_the_numbers():
    assert plan(_tc(processes=1)).count == 1
    got = plan(_tc(coordinator="h:1"), env={"QTL_PROCESS_ID": "1"})
    assert (got.count, got.index, got.coordinator, got.primary) == (2, 1, "h:1", False)
    slurm = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    assert plan(_tc(), env=slurm).primary  # SLURM's environment gives index and coordinator
    for tc, env, said in [
        (_tc(), {**slurm, "SLURM_NTASKS": "1"}, "train.processes=2 but SLURM started 1 task"),
        (_tc(coordinator="h:1"), {}, "this process's index is unknown"),
        (_tc(process_id=2, coordinator="h:1"), {}, "out of range for train.processes=2"),
        (_tc(process_id=0), {}, "no coordinator"),
        (_tc(processes=0), {}, "expected a positive integer"),
    ]:
        with pytest.raises(DistributedError, match=said):
            plan(tc, env=env)


def test_each_process_reads_its_rows_of_the_same_batches():
    """Two processes' shares of every batch, put side by side, are the single process's
    batches: the same examples in the same order, the same mask, the same augmented pixels."""
    from functools import partial

    import numpy as np

    from qtl.data.augment import augment_host
    from qtl.data.loader import batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 12, 12), dtype=np.uint8)
    labels = rng.random((37, 3)).astype(np.float32)

    def stream(rows=None):
        aug = partial(augment_host, rows=None if rows is None else (*rows, 8))
        return list(batches(images, labels, 8, seed=3, epoch=2, transform=aug, rows=rows))

    whole, first, second = stream(), stream((0, 4)), stream((4, 8))
    assert len(whole) == len(first) == len(second) == 5  # the last batch padded and masked
    for w, a, b in zip(whole, first, second, strict=True):
        for field in ("images", "labels", "mask", "indices"):
            joined = np.concatenate([getattr(a, field), getattr(b, field)])
            np.testing.assert_array_equal(getattr(w, field), joined, err_msg=field)
    assert whole[-1].mask.sum() == 5 and second[-1].mask.sum() == 1


def test_a_lost_coordinator_ends_the_process_in_one_line_with_exit_2(tmp_path):
    """Process 1 of 2, and no process 0 ever answers: one line, exit 2, nothing trained."""
    proc = launch(
        *TINY,
        f"hydra.run.dir={tmp_path / 'run'}",
        "train.processes=2",
        f"train.coordinator=127.0.0.1:{_free_port()}",
        "train.process_id=1",
        "train.coordinator_timeout_s=2",
        cwd=Path.cwd(),
        env={"XLA_FLAGS": ""},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "process 1 gave up reaching coordinator 127.0.0.1:" in proc.stderr
    assert "train.coordinator_timeout_s=2 s" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_train_the_single_process_run_and_resume_after_a_peer_is_killed(tmp_path):
    """Process 1 is killed (SIGKILL) right after epoch 1's commit; process 0 stops at its next
    collective (one line, exit 1, not a hang); both rerun resume after epoch 1 and finish the
    run the single process trains - equal to the tolerance above."""
    one = tmp_path / "one"
    proc = launch(*TINY, "head=cdl", f"hydra.run.dir={one}", cwd=Path.cwd(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two"
    killed = _processes(two, *TINY, "head=cdl", env={1: {"QTL_FAULT": "after_last_save@1"}})
    (rc0, out0), (rc1, out1) = killed
    assert rc1 == -9 and "QTL_FAULT: killing the process at after_last_save" in out1
    assert rc0 == 1, out0[-3000:]
    assert "qtl: process 0 of 2 stops:" in out0 and "rerunning all processes resumes" in out0
    assert not (two / "results.json").exists()

    again = _processes(two, *TINY, "head=cdl")
    for rc, out in again:
        assert rc == 0, out[-3000:]
        assert f"resuming {two} after epoch 1" in out
    _assert_same_run(one, two)
    import json

    attempts = json.loads((two / "run_config.json").read_text())["attempts"]
    assert [(a["devices"], a["processes"]) for a in attempts] == [(2, 2), (2, 2)]
    # process 0 alone wrote the record: one W&B-free log, one lock, no second writer's files
    assert not (two / ".qtl-run.lock").exists()
