"""mode=report: statistics against scipy, incomplete sweeps, every figure, the CLI, W&B.

Most tests build a sweep folder by hand with qtl's own record writers (RunFiles, results.json
with the keys a run writes), so the numbers under test are known exactly; one slow test runs
a real tiny multirun with a failing job and checks the report the callback writes.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose, launch
from helpers import make_results
from PIL import Image
from scipy import stats

from qtl.config import ConfigError, LoggerConfig, ReportConfig
from qtl.labels import CXR8, CXR14
from qtl.record.files import RunFiles
from qtl.record.wandb_file import read_run_file
from qtl.report import write_report
from qtl.report.collect import ReportError
from qtl.report.stats import pct_diff, signed_log2, stars

TASKS = {"cxr8": list(CXR8), "cxr14": list(CXR14)}
SPLITS = ("test", "external")


def _auroc(task: str, head: str, seed: int, split: str, label: str) -> float:
    """A fixed, distinct AUROC per (task, head, seed, split, label); CDL a little higher."""
    key = f"{task}/{head}/{seed}/{split}/{label}"
    rng = np.random.default_rng(sum(ord(c) * (i + 1) for i, c in enumerate(key)))
    return float(0.72 + (0.03 if head == "cdl" else 0.0) + 0.04 * rng.standard_normal())


def _write_run(root: Path, task: str, head: str, seed: int, *, finished: bool = True) -> Path:
    """The files one job leaves, written with qtl's writers; results.json only if finished."""
    run_dir = root / f"{task}-{head}" / f"seed{seed}"
    files = RunFiles(run_dir)
    labels = TASKS[task]
    epochs = 3 + seed + (4 if head == "dqc" else 0)
    history = [
        {
            "epoch": e,
            "step": 10 * e,
            "train_loss": 0.6 / e + 0.01 * seed,
            "val_loss": 0.65 / e + (0.05 if head == "dqc" else 0.0),
            "val_mean_auroc": 0.6,
            "best": True,
            "seconds": 1.0,
        }
        for e in range(1, epochs + 1)
    ]
    files.write_metrics(history if finished else history[:2])
    files.config.write_text(json.dumps({"config": {"task": {"name": task}, "head": {"name": head},
                                                   "seed": seed}}))  # fmt: skip
    if not finished:
        return run_dir
    auroc = {}
    for split in SPLITS:
        per_label = {x: _auroc(task, head, seed, split, x) for x in labels}
        auroc[split] = {"mean": float(np.mean(list(per_label.values()))), "per_label": per_label}
    results = make_results(
        run=f"hand/{task}-{head}/seed{seed}",
        task=task,
        head=head,
        seed=seed,
        labels=labels,
        epochs=epochs,
        best_epoch=epochs - 1,
        stopped="early_stopping",
        best_val_loss=history[-2]["val_loss"],
        final_val_loss=history[-1]["val_loss"],
        auroc=auroc,
        # reverse of the task order, so sorting by frequency is visible
        train_label_counts={x: 10 * (i + 1) for i, x in enumerate(labels)},
        wall_seconds={"data": 1.0, "train": 20.0 + seed, "evaluate": 2.0},
        hardware={"device": "cpu", "platform": "cpu", "host": "test", "cpus": 2},
    )
    files.write_results(results)
    return run_dir


def _sweep(root: Path, seeds=(0, 1, 2), tasks=("cxr8",)) -> Path:
    for task in tasks:
        for head in ("cdl", "dqc"):
            for seed in seeds:
                _write_run(root, task, head, seed)
    return root


def _report(sweep: Path, **kw) -> Path:
    return write_report(ReportConfig(sweep=str(sweep), **kw))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _expected(task: str, split: str, label: str | None, seeds) -> tuple[float, float, float]:
    """t, p and % diff computed directly with scipy from the values the records hold."""

    def value(head: str, seed: int) -> float:
        if label is not None:
            return _auroc(task, head, seed, split, label)
        return float(np.mean([_auroc(task, head, seed, split, x) for x in TASKS[task]]))

    a = [value("cdl", s) for s in seeds]
    b = [value("dqc", s) for s in seeds]
    res = stats.ttest_rel(a, b)
    return (
        float(res.statistic),
        float(res.pvalue),
        200 * (np.mean(a) - np.mean(b)) / (np.mean(a) + np.mean(b)),
    )


def test_statistics_equal_scipy_on_the_mean_and_every_label(tmp_path):
    out = _report(_sweep(tmp_path / "sweep", seeds=(0, 1, 2, 3)))
    rows = _rows(out.parent / "tables" / "comparison.csv")
    assert len(rows) == len(SPLITS) * (1 + len(CXR8))
    for row in rows:
        split = "test" if row["test_set"] == "internal test" else "external"
        label = None if row["label"] == "mean AUROC" else row["label"]
        t, p, pct = _expected("cxr8", split, label, (0, 1, 2, 3))
        assert row["n_pairs"] == "4"
        assert abs(float(row["p"]) - p) <= 1e-12
        assert abs(float(row["t"]) - t) <= 1e-9 * max(1.0, abs(t))
        assert abs(float(row["pct_diff"]) - pct) <= 1e-9
        assert row["stars"] == stars(p)
    # per-label rows follow training frequency (most positives first), not the task order
    labels = [r["label"] for r in rows if r["test_set"] == "internal test"][1:]
    assert labels == list(reversed(CXR8))


def test_stars_pct_diff_and_volcano_axis():
    assert [stars(p) for p in (0.0005, 0.005, 0.03, 0.2, math.nan)] == ["***", "**", "*", "ns", ""]
    assert stars(0.08, alpha=0.1) == "*"
    assert pct_diff(0.77, 0.70) == pytest.approx(100 * 2 * 0.07 / 1.47)
    assert signed_log2(-3.0) == -2.0 and signed_log2(0.0) == 0.0 and signed_log2(7.0) == 3.0


def test_missing_seed_and_failed_run_use_complete_pairs_only(tmp_path):
    root = tmp_path / "sweep"
    for seed in (0, 1, 2, 3, 4):
        _write_run(root, "cxr8", "cdl", seed)
    for seed in (0, 1, 3):
        _write_run(root, "cxr8", "dqc", seed)
    failed = _write_run(root, "cxr8", "dqc", 2, finished=False)  # dqc seed 4: never started
    (failed / "job_error.txt").write_text("DataError: image x.png is unreadable\n")

    out = _report(root)
    rows = _rows(out.parent / "tables" / "comparison.csv")
    for row in rows:
        split = "test" if row["test_set"] == "internal test" else "external"
        label = None if row["label"] == "mean AUROC" else row["label"]
        _, p, _ = _expected("cxr8", split, label, (0, 1, 3))
        assert row["n_pairs"] == "3" and abs(float(row["p"]) - p) <= 1e-12
    means = {r["head"]: r for r in _rows(out.parent / "tables" / "mean_auroc.csv")}
    assert means["cdl"]["n_seeds"] == "5" and means["dqc"]["seeds"] == "0 1 3"
    text = out.read_text()
    assert "9 run(s) found: 8 finished, 1 failed or unfinished; 1 missing" in text
    assert "only complete seed pairs" in text and "CXR8: seeds 0, 1, 3 (left out: 2, 4" in text
    assert "**failed** `cxr8-dqc/seed2`" in text
    assert "DataError: image x.png is unreadable" in text
    assert "**missing** cxr8 dqc seed 4" in text
    runs = {(r["head"], r["seed"]): r for r in _rows(out.parent / "tables" / "runs.csv")}
    assert runs[("dqc", "2")]["status"].startswith("failed: DataError")
    assert runs[("cdl", "4")]["status"] == "finished"


def test_every_figure_is_written_and_linked(tmp_path):
    out = _report(_sweep(tmp_path / "sweep", tasks=("cxr8", "cxr14")))
    folder = out.parent / "figures"
    expected = {
        "mean_auroc.png",
        "volcano_cxr8.png",
        "volcano_cxr14_additions.png",
        "loss_cxr8.png",
        "loss_cxr14.png",
        *(f"per_label_{t}_{s}.png" for t in TASKS for s in SPLITS),
    }
    assert {p.name for p in folder.iterdir()} == expected
    text = out.read_text()
    for name in expected:
        path = folder / name
        assert path.stat().st_size > 10_000, name  # a drawn figure, not an empty canvas
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 300
            assert len(set(im.convert("L").getdata())) > 20, name  # more than a blank page
        assert f"(figures/{name})" in text
    for name in ("headline", "mean_auroc", "per_label_auroc", "comparison", "convergence", "runs"):
        assert (out.parent / "tables" / f"{name}.csv").stat().st_size > 0
        assert f"(tables/{name}.md)" in text
    conv = {(r["task"], r["head"]): r for r in _rows(out.parent / "tables" / "convergence.csv")}
    assert float(conv[("cxr8", "dqc")]["best_epoch"]) == 7.0  # seeds 0..2: best 6, 7, 8
    assert float(conv[("cxr8", "cdl")]["epochs"]) == 4.0  # 3, 4, 5


def test_figure_selection_and_output_folder(tmp_path):
    out = _report(
        _sweep(tmp_path / "sweep"), out=str(tmp_path / "elsewhere"), figures=["volcano"], dpi=50
    )
    assert out == tmp_path / "elsewhere" / "report.md"
    assert [p.name for p in (out.parent / "figures").iterdir()] == ["volcano_cxr8.png"]
    assert not (tmp_path / "sweep" / "report").exists()


def test_one_seed_gives_no_p_values_but_a_report(tmp_path):
    out = _report(_sweep(tmp_path / "sweep", seeds=(0,)))
    rows = _rows(out.parent / "tables" / "comparison.csv")
    assert all(r["p"] == "" and r["stars"] == "" and r["n_pairs"] == "1" for r in rows)
    assert (out.parent / "figures" / "volcano_cxr8.png").stat().st_size > 0


def test_one_head_only_reports_without_a_comparison(tmp_path):
    for seed in (0, 1):
        _write_run(tmp_path / "sweep", "cxr8", "cdl", seed)
    out = _report(tmp_path / "sweep")
    assert "No CDL vs DQC comparison" in out.read_text()
    assert _rows(out.parent / "tables" / "comparison.csv") == []
    assert len(_rows(out.parent / "tables" / "mean_auroc.csv")) == len(SPLITS)
    assert (out.parent / "figures" / "mean_auroc.png").stat().st_size > 0


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="report.sweep is not set"):
        write_report(ReportConfig())
    with pytest.raises(ReportError, match="no such directory"):
        _report(tmp_path / "nope")
    (tmp_path / "empty" / "junk").mkdir(parents=True)
    with pytest.raises(ReportError, match="no runs found"):
        _report(tmp_path / "empty")
    with pytest.raises(ConfigError, match="report.alpha"):
        _report(_sweep(tmp_path / "sweep"), alpha=1.5)


def test_report_config_is_validated_at_compose():
    cfg = compose("mode=report", "report.sweep=multirun/x", "report.figures=[volcano]")
    assert cfg.report.sweep == "multirun/x" and [f.value for f in cfg.report.figures] == ["volcano"]
    with pytest.raises(Exception, match="figures"):
        compose("report.figures=[bars3d]")


@pytest.mark.slow
def test_cli_mode_report(tmp_path):
    sweep = _sweep(tmp_path / "multirun" / "grid")
    proc = launch("mode=report", f"report.sweep={sweep}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 finished, 0 failed, 0 missing" in proc.stdout
    assert (sweep / "report" / "report.md").exists()
    assert not list(tmp_path.rglob("checkpoints"))  # nothing trained

    bad = launch("mode=report", f"report.sweep={tmp_path / 'nope'}", cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert "ReportError" in bad.stderr and "no such directory" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_wandb_summary_run_holds_tables_and_figures(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = _sweep(tmp_path / "grid")
    out = write_report(
        ReportConfig(sweep=str(sweep), figures=["mean_auroc"]), LoggerConfig(name="wandb")
    )
    import wandb

    wandb.teardown()  # finish() can return before the W&B service has flushed the run file
    files = list((out.parent / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rec = read_run_file(files[0])
    assert rec["run"]["group"] == "grid" and "report" in rec["run"]["tags"]
    assert rec["run"]["id"] == (out.parent / "wandb_run_id").read_text().strip()
    _, p, _ = _expected("cxr8", "test", None, (0, 1, 2))
    assert abs(rec["summary"]["cxr8/internal_test/p"] - p) <= 1e-12
    (logged,) = rec["history"]  # one step: every table and figure
    assert logged["figure/mean_auroc/_type"] == "image-file"
    assert logged["table/comparison/_type"] == "table-file"
    assert logged["table/comparison/nrows"] == len(SPLITS) * (1 + len(CXR8))
    assert logged["table/runs/nrows"] == 6
    run_files = files[0].parent / "files"
    assert (run_files / logged["figure/mean_auroc/path"]).stat().st_size > 0


@pytest.mark.slow
def test_multirun_writes_the_report_and_still_reports_a_failed_job(synth_root, tmp_path):
    # dqc's folder belongs to another config, so that job fails with a ConfigError
    taken = tmp_path / "multirun" / "debug" / "cxr8-dqc" / "seed0"
    taken.mkdir(parents=True)
    (taken / "run_config.json").write_text(json.dumps({"identity": {"seed": 99}}))
    proc = launch(
        "-m", *TINY, f"data.root={synth_root}", "train.max_epochs=1", "head=cdl,dqc", cwd=tmp_path
    )
    assert proc.returncode != 0  # the failed job is not hidden by the report
    assert "belongs to a run with a different config" in proc.stderr
    report = tmp_path / "multirun" / "debug" / "report" / "report.md"
    assert report.exists(), proc.stderr[-3000:]
    text = report.read_text()
    assert "2 run(s) found: 1 finished, 1 failed or unfinished; 0 missing" in text
    assert "**failed** `cxr8-dqc/seed0`" in text
    assert "ConfigError: run directory" in text
    assert "CXR8: seeds none (left out: 0" in text
    for name in ("mean_auroc", "loss_cxr8", "per_label_cxr8_test", "per_label_cxr8_external"):
        assert (report.parent / "figures" / f"{name}.png").stat().st_size > 0

    # report.auto=false: no report, and the job's failure still decides the exit status
    skipped = launch("-m", *TINY, "backend=torch", "name=noreport", "report.auto=false",
                     cwd=tmp_path)  # fmt: skip
    assert skipped.returncode != 0 and "cannot train: " in skipped.stderr
    assert (tmp_path / "multirun" / "noreport" / "cxr8-dqc" / "seed0").is_dir()
    assert not (tmp_path / "multirun" / "noreport" / "report").exists()
