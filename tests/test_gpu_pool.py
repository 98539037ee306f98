"""hydra/launcher=gpu_pool: at most one job per GPU and each job sees exactly one device;
without GPUs the cores are split between jobs; the sweep summary says what each job did;
job and result files are signed JSON, and a pickled or tampered one is refused unread."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
from conftest import ROOT
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from hydra_plugins.qtl_launchers import _worker
from hydra_plugins.qtl_launchers._files import (
    JOB,
    JOB_FIELDS,
    RESULT,
    JobFileError,
    new_key,
    read_signed,
    sha256,
    write_signed,
)
from hydra_plugins.qtl_launchers.gpu_pool import GpuPoolLauncher, Slot, _Running, make_slots

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


def _seen(cwd: Path, pattern: str = "job*/seen.json") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cwd / "sweep").glob(pattern))]


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
    # a sweep folder stamped to the microsecond: a job that re-resolved ${now:...} itself
    # would write somewhere else than the launcher's sweep folder
    stamp = "hydra.sweep.dir=sweep/at-${now:%H-%M-%S-%f}"
    proc = _sweep(tmp_path, "job=range(5)", "hydra.launcher.gpus=[3,7]", stamp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = list((tmp_path / "sweep").iterdir())
    assert len(dirs) == 1, f"jobs wrote to several sweep folders: {dirs}"
    sweep_dir = dirs[0]
    seen = _seen(tmp_path, "at-*/job*/seen.json")
    assert sorted(s["job"] for s in seen) == [0, 1, 2, 3, 4]
    for s in seen:  # each job got the config Hydra composed for it, typed as Hydra types it
        assert s["sweep_dir"] == str(sweep_dir) and s["hydra_mode"] == "<RunMode.MULTIRUN: 2>"
        assert (s["job_num"], s["job_id"]) == (s["job"], f"gpu_pool_{s['job']}")
    assert not list((sweep_dir / ".gpu_pool").glob("job*.json")), "job files left behind"
    assert not list((sweep_dir / ".gpu_pool").glob("job*.yaml"))
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


def test_gpus_per_job_packs_the_grid_on_groups_of_gpus(tmp_path, monkeypatch):
    """k GPUs per job: the GPUs nvidia-smi lists (a stand-in) grouped by k, the rest idle;
    too few GPUs for one job refused naming both numbers; CPU-only jobs see k host devices."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=index" ] && printf "0\\n1\\n2\\n3\\n4\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    slots = make_slots(None, None, None, cores=list(range(8)), gpus_per_job=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]  # GPU 4 idle
    assert [s.cpus for s in slots] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert slots[0].name == "GPUs 0,1"
    assert len(make_slots(None, None, None, cores=[0], gpus_per_job=5)) == 1
    with pytest.raises(ValueError, match="gpus_per_job=6 but only 5 GPU"):
        make_slots(None, None, None, cores=[0], gpus_per_job=6)
    with pytest.raises(ValueError, match="gpus_per_job=0"):
        make_slots(["0"], None, None, cores=[0], gpus_per_job=0)
    cpu = make_slots([], 2, None, cores=[0, 1], gpus_per_job=2)
    assert [s.env["XLA_FLAGS"] for s in cpu] == ["--xla_force_host_platform_device_count=2"] * 2
    assert "XLA_FLAGS" not in make_slots([], 1, None, cores=[0])[0].env


# -- job and result files: signed JSON, never pickle ------------------------------------


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _job_files(tmp_path: Path, key: bytes, config: str = "job: 1\n") -> tuple[Path, Path]:
    """A job file and config as the launcher writes them (fields only; no real config)."""
    config_file = tmp_path / "job1.yaml"
    config_file.write_text(config)
    body = {
        "job": 1,
        "overrides": ["job=1"],
        "config_file": config_file.name,
        "config_sha256": sha256(config_file.read_bytes()),
        "task": {
            "module": None,
            "file": str(ROOT / "tests" / "pool_app" / "app.py"),
            "name": "main",
        },
        "version_base": "1.3",
        "resolver_cache": [],
        "callbacks": [],
    }
    write_signed(tmp_path / "job1.json", JOB, body, key)
    return tmp_path / "job1.json", config_file


def test_job_files_refuse_tampering_and_foreign_keys(tmp_path):
    key = new_key()
    job_file, config_file = _job_files(tmp_path, key)
    assert read_signed(job_file, JOB, key, JOB_FIELDS)["overrides"] == ["job=1"]
    with pytest.raises(JobFileError, match="signature does not match"):  # another sweep's key
        read_signed(job_file, JOB, new_key(), JOB_FIELDS)

    # a config that names code to run (a callback's _target_) in place of the launcher's
    config_file.write_text("hydra:\n  callbacks:\n    x: {_target_: os.system, _args_: [id]}\n")
    with pytest.raises(JobFileError, match=f"{config_file.name} is not the config the launcher"):
        _worker.read_job(job_file, key)

    doc = json.loads(job_file.read_text())  # the job file edited by hand
    doc["body"]["task"]["file"] = str(tmp_path / "evil.py")
    job_file.write_text(json.dumps(doc))
    with pytest.raises(JobFileError, match="job1.json was not written for this job"):
        read_signed(job_file, JOB, key, JOB_FIELDS)

    doc["body"].pop("callbacks")  # signed, but not the schema: a clear error too
    write_signed(job_file, JOB, doc["body"], key)
    with pytest.raises(JobFileError, match="field 'body.callbacks' is missing"):
        read_signed(job_file, JOB, key, JOB_FIELDS)
    job_file.write_text('["a", "list"]')
    with pytest.raises(JobFileError, match="expected an object with keys"):
        read_signed(job_file, JOB, key, JOB_FIELDS)


@pytest.mark.slow
def test_worker_refuses_a_pickled_job_file_unread(tmp_path):
    job_file, marker = tmp_path / "job0.json", tmp_path / "pwned"
    job_file.write_bytes(pickle.dumps(_Payload(marker)))
    proc = subprocess.run(
        [sys.executable, "-m", "hydra_plugins.qtl_launchers._worker", str(job_file), "res.json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        input=new_key().hex() + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{job_file} is not a gpu_pool job file: not JSON" in proc.stderr
    assert not marker.exists() and not (tmp_path / "res.json").exists()
    no_key = subprocess.run(  # started by hand, without the launcher's key: refused too
        [sys.executable, "-m", "hydra_plugins.qtl_launchers._worker", str(job_file), "res.json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        input="",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_key.returncode == 2 and "no job key on stdin" in no_key.stderr


def _finished_job(tmp_path: Path, idx: int = 4) -> _Running:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    config = OmegaConf.create({"job": idx, "hydra": {"overrides": {"task": [f"job={idx}"]}}})
    files = [tmp_path / f"job{idx}{ext}" for ext in (".json", ".yaml", ".result.json", ".log")]
    for f in files[:2]:
        f.write_text("{}")
    files[3].write_text("")
    return _Running(idx, Slot("CPU slot 0", {}, [0]), proc, *files, config, time.time())


def _result(idx: int, **fields) -> dict:
    body = {"job": idx, "status": "COMPLETED", "return_value": None, "return_repr": None}
    dirs = {"working_dir": "/w", "output_dir": "/w/run"}
    return {**body, "error": None, "task_name": "app", **dirs, **fields}


def test_results_come_back_as_json_and_a_planted_one_is_refused(tmp_path):
    key = new_key()
    job = _finished_job(tmp_path)
    write_signed(job.result_file, RESULT, _result(4, return_value={"auroc": 0.75}), key)
    ret = GpuPoolLauncher._collect(job, key)
    assert ret.status == JobStatus.COMPLETED and ret.return_value == {"auroc": 0.75}
    assert ret.overrides == ["job=4"] and ret.cfg == {"job": 4} and ret.working_dir == "/w"
    assert ret.hydra_cfg.hydra.runtime.output_dir == "/w/run"  # the sweeper finds the run here
    assert not job.result_file.exists() and not job.job_file.exists()  # collected, tidied

    error = {"type": "ValueError", "module": "builtins", "message": "bad\nline 2", "traceback": "T"}
    job = _finished_job(tmp_path)
    write_signed(job.result_file, RESULT, _result(4, status="FAILED", error=error), key)
    ret = GpuPoolLauncher._collect(job, key)
    assert ret.status == JobStatus.FAILED
    assert type(ret._return_value) is ValueError and str(ret._return_value) == "bad\nline 2"
    error = {"type": "ConfigError", "module": "qtl.config", "message": "no", "traceback": "T"}
    write_signed(job.result_file, RESULT, _result(4, status="FAILED", error=error), key)
    err = GpuPoolLauncher._collect(job, key)._return_value
    assert type(err).__name__ == "ConfigError" and str(err) == "no"  # named, never imported

    marker = tmp_path / "pwned"
    for planted, message in [
        (
            pickle.dumps(_Payload(marker)),
            "job4.result.json is not a gpu_pool result file: not JSON",
        ),
        (b'{"format": "qtl-gpu-pool-result", "version": 1}', "expected an object with keys"),
    ]:
        job = _finished_job(tmp_path)
        job.result_file.write_bytes(planted)
        ret = GpuPoolLauncher._collect(job, key)
        assert ret.status == JobStatus.FAILED and isinstance(ret._return_value, JobFileError)
        assert message in str(ret._return_value)
    assert not marker.exists()
    for body, message in [  # signed with another key; a result for another job
        (_result(4), "not written for this job"),
        (_result(3), "a result for job #3"),
    ]:
        job = _finished_job(tmp_path)
        write_signed(job.result_file, RESULT, body, key if body["job"] == 3 else new_key())
        ret = GpuPoolLauncher._collect(job, key)
        assert ret.status == JobStatus.FAILED and message in str(ret._return_value)
    job = _finished_job(tmp_path)  # no result: the worker refused its job file, and said why
    job.log_file.write_text("[gpu_pool] error: job4.json was not written for this job by ...\n")
    err = str(GpuPoolLauncher._collect(job, key)._return_value)
    assert "exited with code 0 before finishing (job4.json was not written for this job" in err


@pytest.mark.slow
def test_sweep_refuses_a_planted_pickle_result(tmp_path):
    """A job process that leaves a pickled result file (that would create a file if loaded)
    and dies: the launcher reports that job failed with the reason, loads nothing."""
    proc = _sweep(tmp_path, "job=range(2)", "forge=1", "sleep=0", "hydra.launcher.gpus=[0]")
    assert proc.returncode != 0
    assert "job1.result.json is not a gpu_pool result file: not JSON" in proc.stderr
    assert not (tmp_path / "sweep" / "job1" / "pwned").exists()
    assert [s["job"] for s in _seen(tmp_path)] == [0]  # the other job ran as usual
