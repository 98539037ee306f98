"""End to end: the real config, the real readers on synthetic data in the real formats,
the jitted trainer, checkpoints, records and W&B offline files — with tiny sizes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import LARGE_SIZES, ROOT, TINY, compose, launch
from helpers import read_metrics as _metrics
from helpers import read_results

from qtl.apps.train import train_and_evaluate
from qtl.record.wandb_file import read_run_file

pytestmark = pytest.mark.slow


def _tiny(synth_root: Path, *extra: str):
    return compose(*TINY, f"data.root={synth_root}", *extra)


def test_train_writes_records_and_rerun_skips(synth_root, tmp_path, capsys):
    cfg = _tiny(synth_root, "head=dqc")
    run_dir = tmp_path / "run"
    res = train_and_evaluate(cfg, run_dir)

    saved = read_results(run_dir)
    assert saved["auroc"]["test"]["mean"] == res["auroc"]["test"]["mean"]
    assert set(saved["auroc"]) == {"val", "test", "external"}
    assert list(saved["auroc"]["test"]["per_label"]) == list(cfg.task.labels)
    assert saved["parameters"]["quantum weights (theta)"] == 3 * 8
    assert saved["epochs"] == 2 and 1 <= saved["best_epoch"] <= 2
    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)
    for split, n in saved["split_sizes"].items():
        if split == "train":
            continue
        lines = (run_dir / f"predictions_{split}.csv").read_text().splitlines()
        assert len(lines) == n + 1 and lines[0].startswith("id,Atelectasis")
    # a label whose split has one class is reported as undefined (None), not a crash
    values = [v for s in saved["auroc"].values() for v in s["per_label"].values()]
    assert all(v is None or 0.0 <= v <= 1.0 for v in values)

    capsys.readouterr()
    again = train_and_evaluate(cfg, run_dir)
    assert "finished already" in capsys.readouterr().out
    assert again == saved
    assert len(_metrics(run_dir)) == 2


def test_changed_config_in_same_run_dir_is_refused(synth_root, tmp_path):
    from qtl.config import ConfigError

    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    train_and_evaluate(_tiny(synth_root, "head=cdl", "train.max_epochs=1"), run_dir)
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="train.lr"):
        train_and_evaluate(
            _tiny(synth_root, "head=cdl", "train.max_epochs=1", "train.lr=0.5"), run_dir
        )
    assert (run_dir / "results.json").read_bytes() == before


def test_same_seed_same_batches_for_both_heads(synth_root, tmp_path, monkeypatch):
    """Through the trainer's own loop: CDL and DQC get identical images, labels and keys."""
    import qtl.train.loop as loop

    seen: dict[str, list] = {}
    real_batches = loop.batches

    def spy(head):
        def wrapped(*args, **kwargs):
            for b in real_batches(*args, **kwargs):
                seen[head].append((b.indices.copy(), b.images.copy(), jax.random.key_data(b.key)))
                yield b

        return wrapped

    for head in ("cdl", "dqc"):
        seen[head] = []
        monkeypatch.setattr(loop, "batches", spy(head))
        train_and_evaluate(_tiny(synth_root, f"head={head}", "seed=5"), tmp_path / head)
    assert len(seen["cdl"]) == len(seen["dqc"]) > 0
    for (ia, xa, ka), (ib, xb, kb) in zip(seen["cdl"], seen["dqc"], strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ka, kb)


def test_kill_and_rerun_resumes_exactly(synth_root_large, tmp_path):
    """SIGKILL mid-training, rerun the same command: no repeated or lost epoch, and the
    resumed history equals an uninterrupted run's."""
    args = [
        *TINY,
        f"data.root={synth_root_large}",
        "head=cdl",
        "train.max_epochs=4",
        "data.limit=400",
        LARGE_SIZES,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args, "name=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run_dir = tmp_path / "outputs" / "killed" / "cxr8-cdl" / "seed0"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, f"ended before it was killed:\n{out[-3000:]}"
    done_before = len(_metrics(run_dir))
    assert 1 <= done_before < 4 and not (run_dir / "results.json").exists()

    resumed = launch(*args, "name=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[qtl] resuming" in resumed.stdout
    assert f"after epoch {done_before} " in resumed.stdout
    assert [r["epoch"] for r in _metrics(run_dir)] == [1, 2, 3, 4]

    straight = launch(*args, "name=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    ref = _metrics(tmp_path / "outputs" / "straight" / "cxr8-cdl" / "seed0")
    for a, b in zip(_metrics(run_dir), ref, strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)


def test_wandb_offline_run_files_hold_the_metrics(synth_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _tiny(synth_root, "head=dqc", "logger=wandb", "train.log_every=2")
    run_dir = tmp_path / "run"
    res = train_and_evaluate(cfg, run_dir)
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rec = read_run_file(files[0])
    assert rec["run"]["group"] == "cxr8-dqc" and {"cxr8", "dqc", "seed0"} <= set(rec["run"]["tags"])
    assert rec["run"]["id"] == (run_dir / "wandb_run_id").read_text().strip() == res["wandb_run_id"]
    train_losses = [h["train/loss"] for h in rec["history"] if "train/loss" in h]
    val_losses = [h["val/loss"] for h in rec["history"] if "val/loss" in h]
    assert len(train_losses) >= 2 and all(np.isfinite(train_losses))
    assert val_losses == pytest.approx([r["val_loss"] for r in _metrics(run_dir)])
    assert rec["summary"]["test/mean_auroc"] == pytest.approx(res["auroc"]["test"]["mean"])
    assert rec["config"]["head"]["name"] == "dqc" and rec["config"]["seed"] == 0
    # made from synthetic data: the W&B run says so where a reader looks
    assert "synthetic" in rec["run"]["tags"] and rec["summary"]["data_source"] == "synthetic"
    assert rec["config"]["data_source"] == "synthetic"
    # a file cut short anywhere (its writer killed) reads back up to its last whole record
    data, cut = files[0].read_bytes(), tmp_path / "cut.wandb"
    for end in range(8, len(data), max(1, len(data) // 40)):
        cut.write_bytes(data[:end])
        history = read_run_file(cut)["history"]
        assert history == rec["history"][: len(history)], end


def _wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) each metric reached W&B with, over all of the run's segments."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for row in read_run_file(path)["history"]:
            for key, value in row.items():
                if "/" in key:  # train/loss, val/loss, ...: not W&B's own _step/_runtime
                    out.setdefault(key, []).append((row["_step"], value))
    return out


@pytest.mark.parametrize("point", ["before_best_save", "after_last_save"])
def test_a_crashed_run_logs_each_step_to_wandb_once(point, synth_root, tmp_path, monkeypatch):
    # before_best_save: epoch 1 is logged, not committed, and redone after the crash (its
    # rows must not reach W&B twice); after_last_save: committed, its row must not be lost
    from qtl.utils import faults

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _tiny(synth_root, "head=cdl", "logger=wandb", "train.log_every=2")
    twin = tmp_path / "twin"
    train_and_evaluate(cfg, twin)

    run_dir = tmp_path / "run"
    monkeypatch.setenv("QTL_FAULT", f"{point}@1")
    monkeypatch.setenv("QTL_FAULT_ACTION", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault, match=point):
        train_and_evaluate(cfg, run_dir)
    monkeypatch.delenv("QTL_FAULT")
    train_and_evaluate(cfg, run_dir)

    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 2  # one W&B run, resumed
    got, want = _wandb_history(run_dir), _wandb_history(twin)
    assert {"train/loss", "val/loss", "train/epoch_loss"} <= set(want)
    assert set(got) == set(want)
    for key in want:
        steps = [step for step, _ in got[key]]
        assert steps == [step for step, _ in want[key]], key  # none twice, none lost
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-5)


def test_multirun_grid_end_to_end(synth_root, tmp_path):
    proc = launch(
        "-m",
        *TINY,
        f"data.root={synth_root}",
        "train.max_epochs=1",
        "head=cdl,dqc",
        "seed=0,1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(
        p.relative_to(tmp_path / "multirun" / "debug").as_posix()
        for p in (tmp_path / "multirun" / "debug").rglob("results.json")
    )
    assert found == [f"cxr8-{h}/seed{s}/results.json" for h in ("cdl", "dqc") for s in (0, 1)]
    summary = subprocess.run(
        [sys.executable, "-m", "qtl.summary", str(tmp_path / "multirun" / "debug")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (
        summary.returncode == 0
        and "cxr8/dqc/s1" in summary.stdout
        and "mean AUROC" in summary.stdout
    )


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["data=nih_cxr_lt", "data.root=/nonexistent/nih", "backbone.pretrained=null"],
            "/nonexistent/nih",
        ),
        (["data=nih_cxr_lt", "data.root=/nonexistent/nih"], "meant for data=synthetic"),
        (["backend=torch"], "backend=torch cannot train: "),
    ],
)
def test_bad_input_is_one_clear_message(overrides, expected, tmp_path):
    proc = launch(*TINY, *overrides, cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_failed_job_does_not_stop_the_sweep(synth_root, tmp_path):
    proc = launch(
        "-m",
        *TINY,
        f"data.root={synth_root}",
        "train.max_epochs=1",
        "head=cdl",
        "backend=torch,jax",
        cwd=tmp_path,
    )
    assert proc.returncode != 0  # the sweep reports its failure...
    assert "backend=torch cannot train: " in proc.stderr
    # ...but the job after the failed one still ran to the end
    assert (tmp_path / "multirun" / "debug" / "cxr8-cdl" / "seed0" / "results.json").exists()
