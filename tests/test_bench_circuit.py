"""mode=bench_circuit: one process per case, a table and JSON, failures recorded not fatal."""

from __future__ import annotations

import json

import pytest
from conftest import launch


@pytest.mark.slow
def test_bench_circuit_times_each_simulator_in_its_own_process(tmp_path):
    proc = launch(
        "mode=bench_circuit",
        "bench_circuit.qubits=[3]",
        "bench_circuit.rounds=2",
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
    assert [(r["round"], r["simulator"]) for r in results] == [
        (1, "fast"),
        (1, "pennylane"),
        (2, "fast"),
        (2, "pennylane"),
    ]
    for r in results:
        assert r["status"] == "ok" and r["steps_timed"] == 3
        assert 0 < r["min_ms"] <= r["median_ms"] and r["compile_s"] > 0 and r["peak_rss_gb"] > 0
    # the reference ran the same circuit as fast (checked inside its worker)
    assert all(r["max_abs_diff_vs_fast"] < 1e-5 for r in results if r["simulator"] == "pennylane")
    fast = next(r for r in payload["summary"] if r["simulator"] == "fast")
    assert fast["rounds"] == 2 and len(fast["round_medians_ms"]) == len(fast["vs_pennylane"]) == 2
    assert "| 3 | fast |" in proc.stdout and "vs pennylane" in proc.stdout
    assert "load:" in proc.stdout and all("load" in r for r in results)


def test_speed_ups_are_taken_within_each_round_and_shown_as_a_range():
    """A slow round slows both simulators: its ratio is its own, not a mix with another's."""
    from qtl.bench.circuit import format_table, summarise

    def case(rnd, sim, ms, status="ok"):
        return {
            "round": rnd,
            "n_qubits": 19,
            "simulator": sim,
            "status": status,
            "median_ms": ms,
            "min_ms": ms * 0.9,
            "compile_s": 1.0,
            "peak_rss_gb": 1.0,
            "steps_timed": 5,
        }

    results = [
        case(1, "fast", 100.0),
        case(1, "pennylane", 5000.0),
        case(2, "fast", 200.0),
        case(2, "pennylane", 12000.0),
        case(3, "fast", 0.0, status="timed out"),
        case(3, "pennylane", 9000.0),
    ]
    fast = next(r for r in summarise(results) if r["simulator"] == "fast")
    assert fast["vs_pennylane"] == [50.0, 60.0]  # not 9000/100 or 5000/200
    assert fast["median_ms"] == 150.0 and fast["ok"] == 2 and fast["rounds"] == 3
    table = format_table(results)
    assert "| 19 | fast | 150.0 | 100.0–200.0 (1 failed) |" in table
    assert "50.0x–60.0x" in table


def test_bench_circuit_rejects_unknown_simulator(tmp_path):
    proc = launch("mode=bench_circuit", "bench_circuit.simulators=[fast,qiskit]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "bench_circuit.simulators" in proc.stderr and "qiskit" in proc.stderr
