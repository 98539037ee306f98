"""hydra/launcher=gpu_pool: at most one job per GPU and each job sees exactly one device;
without GPUs the cores are split between jobs; the sweep summary says what each job did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
from conftest import ROOT

from hydra_plugins.qtl_launchers.gpu_pool import make_slots

APP = ROOT / "tests" / "pool_app" / "app.py"


def _sweep(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(APP), "-m", "hydra/launcher=gpu_pool", *overrides],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _seen(cwd: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "sweep").glob("job*/seen.json"))]


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def _max_concurrent(seen: list[dict]) -> int:
    events = sorted([(s["start"], 1) for s in seen] + [(s["end"], -1) for s in seen])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


@pytest.mark.slow
def test_one_job_per_gpu_at_most_g_at_once(tmp_path):
    proc = _sweep(tmp_path, "job=range(5)", "hydra.launcher.gpus=[3,7]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = _seen(tmp_path)
    assert sorted(s["job"] for s in seen) == [0, 1, 2, 3, 4]
    assert {s["cuda_visible_devices"] for s in seen} == {"3", "7"}  # one id each, never a list
    assert all(s["xla_preallocate"] == "false" for s in seen)  # no GPU memory grab by default
    assert _max_concurrent(seen) == 2  # both GPUs used, never a third job at once
    for a, b in combinations(seen, 2):
        if _overlap(a, b):
            assert a["cuda_visible_devices"] != b["cuda_visible_devices"], (a, b)


@pytest.mark.slow
def test_cpu_only_splits_cores_between_jobs(tmp_path):
    proc = _sweep(tmp_path, "job=range(4)", "hydra.launcher.gpus=[]", "hydra.launcher.cpu_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = _seen(tmp_path)
    cores = len(os.sched_getaffinity(0))
    assert len(seen) == 4 and _max_concurrent(seen) == 2
    for s in seen:
        assert s["cuda_visible_devices"] == "" and s["jax_platforms"] == "cpu"
        assert len(s["cores"]) == max(1, cores // 2) and s["omp_threads"] == str(len(s["cores"]))
    if cores >= 2:
        for a, b in combinations(seen, 2):
            if _overlap(a, b):
                assert not set(a["cores"]) & set(b["cores"]), (a, b)


def test_slots_memory_settings_and_bad_values():
    slots = make_slots(["0", "1"], None, 0.45, cores=[0, 1, 2, 3])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    assert [s.cpus for s in slots] == [[0, 1], [2, 3]]
    assert all(s.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true" for s in slots)
    assert all(s.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45" for s in slots)
    assert len(make_slots([], None, None, cores=list(range(16)))) == 4  # one CPU job per 4 cores
    with pytest.raises(ValueError, match="xla_mem_fraction"):
        make_slots(["0"], None, 1.5, cores=[0])
    with pytest.raises(ValueError, match="twice"):
        make_slots(["0", "0"], None, None, cores=[0])


@pytest.mark.slow
def test_sweep_summary_lists_failed_then_skipped(tmp_path):
    args = ("job=range(3)", "fail=1", "sleep=0", "hydra.launcher.gpus=[0,1]")
    first = _sweep(tmp_path, *args)
    assert first.returncode != 0  # Hydra reports the failed job after all jobs ran...
    summary = (tmp_path / "sweep" / "sweep_summary.txt").read_text()
    assert "3 job(s): 2 finished, 1 failed" in summary  # ...and the summary is still written
    line = next(x for x in summary.splitlines() if x.strip().startswith("#1 "))
    assert "failed" in line and "ValueError: job 1 broke on purpose" in line
    assert "second line" not in summary and str(Path("sweep") / "job1") in line
    assert summary.strip() in first.stdout

    again = _sweep(tmp_path, *args)
    summary = (tmp_path / "sweep" / "sweep_summary.txt").read_text()
    assert "3 job(s): 2 skipped, 1 failed" in summary, again.stdout[-2000:]
    jobs = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["jobs"]
    assert [j["state"] for j in jobs] == ["skipped", "failed", "skipped"]


def test_gpus_detected_with_nvidia_smi(tmp_path, monkeypatch):
    """G comes from nvidia-smi when not configured (a stand-in script: no GPU here)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=index" ] && printf "0\\n1\\n2\\n3\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    slots = make_slots(None, None, None, cores=list(range(8)))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    assert [s.cpus for s in slots] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no NVIDIA driver: CPU-only jobs
    slots = make_slots(None, 2, None, cores=[0, 1])
    assert [s.env["JAX_PLATFORMS"] for s in slots] == ["cpu", "cpu"]
