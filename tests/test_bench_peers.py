"""The circuit benchmark's peer simulators: same circuit as fast, skipped when not installed,
reported (not timed) when they disagree, and fast's lead over the best of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl.bench import simulators
from qtl.bench.circuit import fast_lead, format_lead, skipped
from qtl.quantum.circuit import CircuitSpec


def _row(n, sim, ms, status="ok"):
    return {"n_qubits": n, "simulator": sim, "status": status, "median_ms": ms}


def test_fast_lead_is_over_the_fastest_peer_that_ran_and_agreed():
    summary = [
        _row(8, "fast", 2.0),
        _row(8, "pennylane", 100.0),
        _row(8, "qulacs", 10.0),
        _row(8, "lightning", 30.0),
        _row(14, "fast", 20.0),
        {"n_qubits": 14, "simulator": "qulacs", "status": "disagrees with fast: ..."},
        _row(14, "lightning", 300.0),
        _row(19, "qulacs", 5.0),  # no fast row at n=19: nothing to compare
        _row(19, "fast", 1.0, status="failed: out of memory"),
    ]
    leads = fast_lead(summary)
    assert [(d["n_qubits"], d["best_peer"]) for d in leads] == [(8, "qulacs"), (14, "lightning")]
    assert leads[0]["lead"] == pytest.approx(5.0) and leads[1]["lead"] == pytest.approx(15.0)
    text = format_lead(leads)
    assert "n=8:" in text and "qulacs 10.0 ms" in text and "5.0x" in text and "15.0x" in text


def test_a_missing_peer_is_skipped_with_a_note_not_an_error(monkeypatch):
    monkeypatch.setitem(simulators.REQUIRES, "qulacs", "qtl_no_such_module_anywhere")
    assert not simulators.available("qulacs")
    rec = skipped({"simulator": "qulacs", "n_qubits": 8, "round": 1})
    assert rec["status"] == "skipped: qtl_no_such_module_anywhere is not installed"
    assert rec["n_qubits"] == 8
    # a skipped row is not ok, so it never counts as the best peer
    assert fast_lead([_row(8, "fast", 1.0), rec]) == []


def test_a_peer_that_disagrees_with_fast_is_reported_not_timed(monkeypatch):
    from qtl.bench import circuit_worker

    real = simulators.make

    def wrong(name, spec, *args, **kwargs):
        circuit = real("fast", spec, *args, **kwargs)
        return circuit if name == "fast" else (lambda x, t: circuit(x, t) * 0.99)

    monkeypatch.setattr(simulators, "make", wrong)
    case = {
        "simulator": "pennylane",
        "n_qubits": 3,
        "batch": 2,
        "features": 4,
        "depth": 1,
        "entangler": "ring",
        "rotation": "ry",
        "steps": 3,
        "warmup": 0,
        "max_seconds": 10.0,
    }
    out = circuit_worker.run_case(case)
    assert out["status"].startswith("disagrees with fast")
    assert out["max_abs_diff_vs_fast"] > circuit_worker.AGREE_TOL
    assert "median_ms" not in out


@pytest.mark.parametrize("rotation", ["ry", "rz_ry"])
def test_qulacs_values_and_gradients_equal_fast(rotation):
    pytest.importorskip("qulacs")
    spec = CircuitSpec(4, 2, "ring", rotation)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1.5, 1.5, (3, 4)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=(2, 4, 2) if rotation == "rz_ry" else (2, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    fast = simulators.make("fast", spec, native=False)
    peer = simulators.make("qulacs", spec)
    np.testing.assert_allclose(peer(x, theta), fast(x, theta), atol=1e-5)

    def loss(circuit):
        return lambda x, t: jnp.sum(w * circuit(x, t))

    want = jax.grad(loss(fast), (0, 1))(x, theta)
    got = jax.jit(jax.grad(loss(peer), (0, 1)))(x, theta)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
