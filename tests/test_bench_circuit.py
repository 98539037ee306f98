"""mode=bench_circuit: one process per case, a table and JSON, failures recorded not fatal."""

from __future__ import annotations

import json

import pytest
from conftest import launch


@pytest.mark.slow
def test_bench_circuit_times_each_simulator_in_its_own_process(tmp_path):
    proc = launch(
        "mode=bench_circuit",
        "bench_circuit.qubits=[3,4]",
        "bench_circuit.simulators=[fast,pennylane]",
        "bench_circuit.steps=3",
        "bench_circuit.warmup=1",
        "bench_circuit.features=16",
        "bench_circuit.batch=4",
        "bench_circuit.out=bench/c.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "bench/c.json").read_text())
    results = payload["results"]
    assert [(r["n_qubits"], r["simulator"]) for r in results] == [
        (3, "fast"),
        (3, "pennylane"),
        (4, "fast"),
        (4, "pennylane"),
    ]
    for r in results:
        assert r["status"] == "ok" and r["steps_timed"] == 3
        assert 0 < r["min_ms"] <= r["median_ms"] and r["compile_s"] > 0 and r["peak_rss_gb"] > 0
    # the reference ran the same circuit as fast (checked inside its worker)
    assert all(r["max_abs_diff_vs_fast"] < 1e-5 for r in results if r["simulator"] == "pennylane")
    assert "| 4 | fast |" in proc.stdout and "vs pennylane" in proc.stdout


def test_bench_circuit_rejects_unknown_simulator(tmp_path):
    proc = launch("mode=bench_circuit", "bench_circuit.simulators=[fast,qiskit]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "bench_circuit.simulators" in proc.stderr and "qiskit" in proc.stderr
