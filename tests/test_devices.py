"""One run over several devices (``train.devices``): the same program as on one device.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` gives a process two devices;
every run here sees two, and only ``train.devices`` differs, so the comparison is of the
sharded program against the unsharded one on the same machine.

Tolerance: the 2-device step computes every global-batch mean (loss, gradients, batch-norm
statistics) as a sum of per-device partial sums, so float32 additions happen in another
order. Each such reordering moves a value by a few ulps (float32 eps = 1.2e-7) relative to the
largest partial sum; over the two short epochs of ``debug=tiny`` and Adam's updates the
differences seen stay below 1e-6, so losses and AUROCs are compared to 1e-5 and parameters to
1e-5 absolute (weights are O(0.1-1)). AUROC moves only when two scores swap order, which a
1e-6 change does not do on these test sets.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY, launch
from helpers import read_metrics, read_results

TWO = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _run(tmp: Path, name: str, *extra: str, env: dict | None = None) -> Path:
    """``launch.py`` in the session's workdir (its synthetic data and pretrained backbone
    caches are shared with the other end-to-end tests), two devices visible."""
    run_dir = tmp / name
    proc = launch(
        f"hydra.run.dir={run_dir}", *extra, cwd=Path.cwd(), env={**TWO, **(env or {})}, timeout=900
    )
    if env is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _predictions(run_dir: Path, split: str) -> np.ndarray:
    with (run_dir / f"predictions_{split}.csv").open() as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("p_") or c.startswith("prob")]
    cols = cols or [c for c in rows[0] if c not in ("id", "index", "path")]
    return np.array([[float(r[c]) for c in cols] for r in rows if r[cols[0]] != ""])


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    last = run_dir / "checkpoints" / "last"
    step = max(int(p.name) for p in last.iterdir() if p.name.isdigit())
    path = last / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckpt:  # as NumPy: saved on 2 devices, read on 1
        meta = ckpt.metadata(path)
        meta = getattr(meta, "item_metadata", None) or meta
        args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            meta.tree if hasattr(meta, "tree") else meta,
        )
        tree = ckpt.restore(path, restore_args=args)
    return {k: np.asarray(v) for k, v in tree.items() if np.asarray(v).dtype.kind == "f"}


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "val_loss", "val_mean_auroc"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
        assert ra["best"] == rb["best"]
    np.testing.assert_allclose(_predictions(a, "test"), _predictions(b, "test"), atol=1e-5)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)
    ra, rb = read_results(a), read_results(b)
    assert json.dumps(sorted(ra.get("test", {}))) == json.dumps(sorted(rb.get("test", {})))


def test_devices_refused_with_both_numbers_and_uneven_batches(tmp_path):
    code = """
import sys
from qtl.utils.mesh import DevicesError, resolve
assert resolve(2).size == 2 and resolve("all").size == 2 and resolve(1).mesh is None
for bad, batches in ((3, ()), (0, ()), ("most", ()), (2, [("train.batch_size", 15)])):
    try:
        resolve(bad, batches)
    except DevicesError as err:
        print(err)
    else:
        sys.exit(f"accepted train.devices={bad!r}")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**_env(), **TWO},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "train.devices=3 but this process sees 2 CPU device(s)" in lines[0]
    assert "expected a positive integer or 'all'" in lines[1]
    assert "'most'" in lines[2]
    assert "train.batch_size=15 does not split over train.devices=2" in lines[3]


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_two_devices_train_the_same_dqc_run(tmp_path):
    one = _run(tmp_path, "one", *TINY, "head=dqc", "train.devices=1")
    two = _run(tmp_path, "two", *TINY, "head=dqc", "train.devices=2")
    _assert_same_run(one, two)


@pytest.mark.slow
def test_a_run_resumes_on_another_device_count(tmp_path):
    """Killed after epoch 1 on two devices, finished on one: the device count is how the run
    is computed, not which run it is, so the rerun resumes instead of starting over."""
    whole = _run(tmp_path, "whole", *TINY, "head=cdl", "train.devices=2")
    _run(
        tmp_path,
        "split",
        *TINY,
        "head=cdl",
        "train.devices=2",
        env={"QTL_FAULT": "after_last_save@1"},
    )
    split = tmp_path / "split"
    assert not (split / "results.json").exists()  # killed after epoch 1's commit
    _run(tmp_path, "split", *TINY, "head=cdl", "train.devices=1")
    _assert_same_run(whole, split)
    attempts = json.loads((split / "run_config.json").read_text())["attempts"]
    assert [a["devices"] for a in attempts] == [2, 1]  # the topology of every attempt
    assert all(a["platform"] == "cpu" and a["processes"] == 1 for a in attempts)


@pytest.mark.slow
def test_two_devices_train_the_same_qvit_run(tmp_path):
    runs = [
        _run(tmp_path, f"qvit{n}", "debug=tiny_medmnist", "model=qvit", f"train.devices={n}")
        for n in (1, 2)
    ]
    _assert_same_run(*runs)


@pytest.mark.slow
def test_scaling_bench_reports_throughput_and_efficiency(tmp_path):
    from qtl.bench.devices import main

    out = tmp_path / "devices.json"
    overrides = ["debug=tiny", "head=cdl", "train.max_epochs=2", "train.batch_size=16"]
    payload = main(["--devices", "1", "2", "--out", str(out), "--overrides", *overrides])
    cases = {c["devices"]: c for c in json.loads(out.read_text())["cases"]}
    assert cases.keys() == {1, 2} and all(c["ok"] for c in cases.values()), payload
    assert cases[1]["images"] == cases[2]["images"] == 96  # epoch 2 of 96 training images
    assert cases[1]["efficiency"] == pytest.approx(1.0)
    assert cases[2]["efficiency"] == pytest.approx(
        cases[2]["images_per_s"] / (2 * cases[1]["images_per_s"])
    )
    assert payload["machine"]["cpu"]
