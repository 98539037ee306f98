"""mode=describe reproduces the study's Table I to the digit for every task and head."""

from __future__ import annotations

import pytest
from conftest import compose, launch

from qtl.studies.cxr import CxrStudy

describe = CxrStudy().describe

BACKBONE = 23_508_032
PRE = {"cxr8": 16_392, "cxr14": 28_686, "cxr19": 38_931}
THETA = {"cxr8": 24, "cxr14": 42, "cxr19": 57}
POST = {"cxr8": 72, "cxr14": 210, "cxr19": 380}


@pytest.mark.parametrize("task", ["cxr8", "cxr14", "cxr19"])
@pytest.mark.parametrize("head", ["cdl", "dqc"])
def test_table_one(task, head):
    rows = dict(
        describe(compose("mode=describe", f"task={task}", f"head={head}", "backbone=resnet50"))
    )
    assert rows["backbone"] == BACKBONE
    if head == "cdl":
        assert rows["classical head (CDL)"] == PRE[task]
        assert rows["total"] == BACKBONE + PRE[task]
    else:
        assert rows["classical pre-process (w_in)"] == PRE[task]
        assert rows["quantum weights (theta)"] == THETA[task]
        assert rows["classical post-process (w_out)"] == POST[task]
        assert rows["total"] == BACKBONE + PRE[task] + THETA[task] + POST[task]


def test_describe_cli_prints_table(tmp_path):
    proc = launch("mode=describe", "task=cxr19", "head=dqc", "backbone=resnet50", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "23,508,032" in proc.stdout and "38,931" in proc.stdout and "380" in proc.stdout
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


@pytest.mark.parametrize("mode", ["describe", "bench_circuit", "cache", "bench_features"])
@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_a_non_jax_backend_is_refused_outside_the_step_benchmark(mode, backend):
    # these modes run qtl's JAX code whatever backend says: ignoring it would label JAX
    # numbers as PyTorch or TF ones
    from qtl.apps import dispatch
    from qtl.config import ConfigError

    cfg = compose(f"mode={mode}", f"backend={backend}")
    with pytest.raises(ConfigError, match=rf"backend={backend} has no mode={mode}: .*bench_step"):
        dispatch(cfg)


def test_describe_with_torch_is_one_clear_message(tmp_path):
    proc = launch("mode=describe", "backend=torch", cwd=tmp_path)
    assert proc.returncode == 2
    assert "backend=torch has no mode=describe" in proc.stderr
    assert "Traceback" not in proc.stderr
