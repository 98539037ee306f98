"""mode=bench_step: Table III, one capped process per framework x head x task case."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, compose, launch

from qtl.bench.step import _protocol, _validate, case_config, cases, format_table, run_case
from qtl.config import ConfigError, HeadName, to_schema

TINY = (
    "backbone=resnet_small",
    "backbone.embedding_size=8",
    "backbone.hidden_sizes=[8,16]",
    "backbone.depths=[1,1]",
    "data.resize=32",
    "data.crop=32",
)


def test_cases_cover_frameworks_heads_and_tasks_with_the_study_protocol():
    cfg = compose(
        "mode=bench_step",
        "experiment=demo",
        "bench_step.backends=[jax,torch,tf]",
        "bench_step.tasks=[cxr8,cxr19]",
        "bench_step.image_px=48",
    )
    todo = cases(cfg)
    per_task = [(c["framework"], c["compile"], c["head"], c["simulator"]) for c in todo[:9]]
    assert per_task == [
        ("jax", "jit", "cdl", None),
        ("jax", "jit", "dqc", "pennylane"),
        ("jax", "jit", "dqc", "fast"),
        ("torch", "eager", "cdl", None),
        ("torch", "eager", "dqc", "pennylane"),
        ("torch", "torch.compile", "cdl", None),
        ("torch", "torch.compile", "dqc", "pennylane"),
        ("tf", "xla", "cdl", None),
        ("tf", "xla", "dqc", "statevector"),
    ]
    assert [c["task"] for c in todo] == ["cxr8"] * 9 + ["cxr19"] * 9
    for c in todo:
        one = to_schema(c["config"])
        assert len(one.task.labels) == c["n_labels"] == {"cxr8": 8, "cxr19": 19}[c["task"]]
        assert one.head.name.value == c["head"] and one.data.crop == c["image_px"] == 48
        # the protocol: no augmentation, BN on running statistics, no download, one Adam
        assert not one.data.augment and one.backbone.batch_norm.value == "inference"
        assert one.backbone.pretrained is None and one.train.backbone_lr is None
        assert one.train.batch_size == c["batch"] == 32 and (c["steps"], c["warmup"]) == (30, 10)
        if c["framework"] == "jax" and c["head"] == "dqc":
            assert one.head.simulator.value == c["simulator"]


def test_case_config_swaps_the_head_and_keeps_the_model():
    cfg = compose("mode=bench_step", "experiment=paper", "head=dqc", "task=cxr19")
    one = to_schema(case_config(cfg, cfg.task, HeadName.cdl, None))
    assert one.head.name == HeadName.cdl and one.backbone.pretrained is None
    assert one.backbone.hidden_sizes == cfg.backbone.hidden_sizes and one.data.crop == 224


@pytest.mark.parametrize(
    "override,message",
    [
        ("bench_step.steps=2", "bench_step.steps=2"),
        ("bench_step.max_rss_gb=0", "bench_step.max_rss_gb=0"),
        ("bench_step.tasks=[cxr9]", "unknown task(s) ['cxr9']"),
        ("bench_step.torch_compile=[]", "bench_step.torch_compile is empty"),
    ],
)
def test_bad_knobs_are_refused(override, message):
    cfg = compose("mode=bench_step", "bench_step.backends=[jax,torch]", override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        _validate(cfg)


def _record(framework, compile_mode, head, sim, task, median, status="ok", n=19):
    return {
        "framework": framework,
        "compile": compile_mode,
        "head": head,
        "simulator": sim,
        "task": task,
        "n_labels": n,
        "status": status,
        "median_s": median,
        "min_s": median,
        "compile_s": 5.0,
        "peak_mb": 2048.0,
    }


def test_table_has_ratios_failures_and_the_study_beside():
    results = [
        _record("jax", "jit", "cdl", None, "cxr19", 2.0),
        _record("jax", "jit", "dqc", "pennylane", "cxr19", None, "timed out after 90 s (x)"),
        _record("jax", "jit", "dqc", "fast", "cxr19", 2.2),
        _record("torch", "eager", "cdl", None, "cxr19", 3.0),
        _record("torch", "eager", "dqc", "pennylane", "cxr19", None, "out of memory: 12 GB"),
    ]
    table = format_table({"results": results})
    lines = table.splitlines()
    fast = next(ln for ln in lines if "qtl fast" in ln)
    assert "| 2.00 | 2.20 | 1.10× | 0.06 / 0.80 (13.3×) | 5.0 / 5.0 | 2.00 / 2.00 |" in fast
    pl = next(ln for ln in lines if "| JAX | jit | PennyLane" in ln)
    assert "| timed out after 90 s | - |" in pl  # no ratio without a DQC time
    torch_row = next(ln for ln in lines if "| PyTorch | eager |" in ln)
    assert "| out of memory |" in torch_row and "0.07 / 1.89 (27.0×)" in torch_row
    assert (
        "- cxr19: JAX fast DQC / JAX CDL = 1.10×; JAX PennyLane DQC: timed out after 90 s; "
        "PyTorch (eager) PennyLane DQC: out of memory" in table
    )


def test_tensorflow_is_compared_with_jax_fast_and_a_cut_short_protocol_is_said():
    results = [
        _record("jax", "jit", "cdl", None, "cxr14", 2.0, n=14),
        _record("jax", "jit", "dqc", "fast", "cxr14", 2.5, n=14),
        _record("jax", "jit", "dqc", "pennylane", "cxr14", 50.0, n=14),
        _record("tf", "xla", "cdl", None, "cxr14", 3.0, n=14),
        _record("tf", "xla", "dqc", "statevector", "cxr14", 5.0, n=14),
        _record("tf", "xla", "dqc", "statevector", "cxr19", None, "out of memory: 12 GB"),
        _record("jax", "jit", "dqc", "fast", "cxr19", 3.0),
    ]
    table = format_table({"results": results})
    tf_line = (
        "- cxr14: JAX fast DQC / JAX CDL = 1.25×; JAX PennyLane DQC / JAX fast DQC = 20.0×; "
        "TensorFlow (xla) DQC / JAX fast DQC = 2.0×"
    )
    assert tf_line in table
    assert "- cxr19: TensorFlow (xla) DQC: out of memory" in table
    config = {"warmup": 3, "steps": 10, "max_seconds": 60}
    for r, (warm, timed) in zip(results, [(3, 9), (3, 5), (1, 3), (2, 4)], strict=False):
        r.update(warmup_done=warm, steps_timed=timed)
    said = _protocol({"config": config, "results": results})
    assert said == (
        "up to 3 warm-up + 10 timed steps, cut short past bench_step.max_seconds=60 "
        "(at least 3 timed): 1–3 warm-up + 3–9 timed steps per case"
    )
    full = [{**r, "warmup_done": 3, "steps_timed": 10} for r in results]
    assert _protocol({"config": config, "results": full}) == "3 warm-up + 10 timed steps"


@pytest.mark.slow
def test_a_case_over_its_memory_or_time_cap_is_killed_and_recorded():
    case = cases(
        compose(*TINY, "mode=bench_step", "experiment=demo", "bench_step.steps=3", "head=cdl")
    )[0]
    oom = run_case(case, timeout_s=300, max_rss_gb=0.15)  # importing JAX alone is more
    assert oom["status"].startswith("out of memory: its processes reached")
    assert "bench_step.max_rss_gb=0.15" in oom["status"] and oom["peak_tree_mb"] > 150
    slow = run_case(case, timeout_s=1.5, max_rss_gb=16)
    assert slow["status"].startswith("timed out after") and slow["wall_s"] < 30
    assert slow["framework"] == "jax" and "config" not in slow


@pytest.mark.slow
def test_bench_step_times_every_framework_and_writes_json_and_markdown(tmp_path):
    proc = launch(
        "mode=bench_step",
        *TINY,
        "bench_step.backends=[jax,torch,tf]",
        "bench_step.tasks=[cxr8]",
        "bench_step.jax_simulators=[fast]",
        "bench_step.torch_compile=[false]",
        "bench_step.batch=4",
        "bench_step.steps=3",
        "bench_step.warmup=1",
        "bench_step.out=bench/s.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "bench/s.json").read_text())
    assert payload["config"]["backends"] == ["jax", "torch", "tf"]
    assert "'bench_step.backends=[jax,torch,tf]'" in payload["command"]
    results = payload["results"]
    assert [(r["framework"], r["head"]) for r in results] == [
        ("jax", "cdl"),
        ("jax", "dqc"),
        ("torch", "cdl"),
        ("torch", "dqc"),
        ("tf", "cdl"),
        ("tf", "dqc"),
    ]
    for r in results:
        assert r["status"] == "ok", r["status"]
        assert r["task"] == "cxr8" and r["n_labels"] == 8 and r["steps_timed"] == 3
        assert 0 < r["min_s"] <= r["median_s"] and r["compile_s"] > 0 and r["peak_mb"] > 100
        assert r["device"] == "cpu" and 0 < r["final_loss"] < 10  # a finite BCE: it trained
        assert r["simulator"] == {"jax": "fast", "torch": "pennylane", "tf": "statevector"}.get(
            r["framework"]
        ) or (r["head"] == "cdl" and r["simulator"] is None)
    md = (tmp_path / "bench/s.md").read_text()
    assert md.startswith("# Table III") and "| cxr8 (8) | TensorFlow | xla |" in md
    assert md.count("| cxr8 (8) |") == 3 and "JAX fast DQC / JAX CDL" in proc.stdout


@pytest.mark.slow
def test_a_missing_framework_is_named_before_anything_runs(tmp_path):
    """Only the core installed: a blocker on sys.meta_path hides TensorFlow."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTF:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            raise ModuleNotFoundError(\"No module named 'tensorflow'\")\n"
        "sys.meta_path.insert(0, _NoTF())\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = launch("mode=bench_step", "bench_step.backends=[jax,tf]", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert "extra 'tf'" in proc.stderr and "pip install -e '.[tf]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_gpu_bench_dry_run_checks_every_command(tmp_path):
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gpu-bench.sh"), "--dry-run"],
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "'bench_step.backends=[jax,torch,tf]'" in out and "bench_step.image_px=224" in out
    assert "'bench_circuit.qubits=[8,14,19]'" in out and "'bench_circuit.qubits=[24]'" in out
    assert "[21/21] cxr8 tf/xla dqc (statevector)" in out
    assert "dry run: all commands check out" in out
    assert list(tmp_path.iterdir()) == []  # checked, nothing run or written
