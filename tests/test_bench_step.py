"""mode=bench_step: the real train step per head, each in its own process, ratio to CDL."""

from __future__ import annotations

import json

import pytest
from conftest import compose, launch

from qtl.bench.step import case_config
from qtl.config import HeadName, to_schema

TINY = (
    "backbone=resnet_small",
    "task=cxr8",
    "train.batch_size=4",
    "data.resize=32",
    "data.crop=32",
)


def test_case_config_swaps_the_head_and_drops_the_download():
    cfg = compose("experiment=paper", "head=dqc", "task=cxr19")
    one = to_schema(case_config(cfg, HeadName.cdl))
    assert one.head.name == HeadName.cdl and one.backbone.pretrained is None
    assert one.backbone == type(one.backbone)(**{**vars(cfg.backbone), "pretrained": None})
    assert one.task == cfg.task and one.data.crop == 224 and one.train == cfg.train


@pytest.mark.slow
def test_bench_step_times_both_heads_and_reports_the_ratio(tmp_path):
    proc = launch(
        "mode=bench_step",
        *TINY,
        "bench_step.steps=3",
        "bench_step.warmup=1",
        "bench_step.out=bench/s.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "bench/s.json").read_text())
    assert payload["config"] == {
        "task": "cxr8",
        "backbone": "resnet_small",
        "batch": 4,
        "image_px": 32,
        "augment": "auto",
        "simulator": "fast",
    }
    results = payload["results"]
    assert [r["head"] for r in results] == ["cdl", "dqc"]
    for r in results:
        assert r["status"] == "ok" and r["steps_timed"] == 3 and r["n_labels"] == 8
        assert 0 < r["min_ms"] <= r["median_ms"] and r["compile_s"] > 0
        assert 0 < r["final_loss"] < 10  # the step really trained: a finite BCE
    ratio = results[1]["median_ms"] / results[0]["median_ms"]
    assert f"| dqc | 8 | fast | {results[1]['median_ms']:.1f} |" in proc.stdout
    assert f"{ratio:.2f}x |" in proc.stdout


def test_bench_step_rejects_too_few_steps(tmp_path):
    proc = launch("mode=bench_step", *TINY, "bench_step.steps=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "bench_step.steps" in proc.stderr
