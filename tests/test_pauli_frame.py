"""Pauli-channel trajectories on the exact kernel (qtl.quantum.noise.pauli_frame): the same
events give the gate-by-gate path's trajectories and gradients; the mean matches PennyLane
default.mixed, value and gradient; Pauli-only models route to it; the per-row kernel is the
shared-layers kernel row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_reference import mixed_z

from qtl.config import HeadConfig, HeadName, NoiseConfig
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.fast import fast_circuit, native_ok, row_state_kernel
from qtl.quantum.noise import noisy_circuit
from qtl.quantum.noise.channels import uniform
from qtl.quantum.noise.pauli_frame import pauli_frame_circuit
from qtl.quantum.noise.trajectories import trajectory_circuit

pytestmark = pytest.mark.skipif(not native_ok(), reason="the native CPU kernels do not run here")

PAULI = NoiseConfig(depolarizing=0.1, depolarizing_2q=0.15, phase_damping=0.2, readout=0.03)


def _inputs(spec: CircuitSpec, batch: int, seed: int = 0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (batch, spec.n_qubits), minval=-1.5, maxval=1.5)
    return x, 2.0 * jax.random.normal(kt, spec.theta_shape)


SPECS = [
    CircuitSpec(5, 2),  # the DQC family: real, statevector.cc
    CircuitSpec(4, 2, "qvit_ring", "rx", "rx"),  # the QViT's layers: complex_circuit.cc
    CircuitSpec(3, 1, "qvit_ring", "rx", "rx"),  # one layer: a product state, no kernel
    CircuitSpec(3, 2, "ring", "rz_ry"),  # complex (RZ, RY); against default.mixed below
]


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_same_events_same_trajectories_and_gradients(spec):
    """Row by row, the Pauli-frame trajectory is the gate-by-gate one with the same draws."""
    params = uniform(spec.n_qubits, PAULI)
    params = type(params)(**{**params.__dict__, "pulses": {"RY": 2, "RX": 2}})  # repeated too
    k, batch = 6, 3
    frame = pauli_frame_circuit(spec, params, k)
    gates = trajectory_circuit(spec, params, k)
    assert frame is not None and frame.events == gates.events > 0
    x, theta = _inputs(spec, batch)
    table = jax.random.uniform(jax.random.key(5), (batch * k, frame.events))
    a = jax.jit(frame.with_uniforms)(x, theta, table)
    b = jax.jit(gates.with_uniforms)(x, theta, table)
    np.testing.assert_allclose(a, b, atol=1e-5)
    exact = np.repeat(np.asarray(fast_circuit(spec)(x, theta)), k, axis=0)
    assert np.abs(np.asarray(b) - exact).max() > 0.1  # Paulis were drawn (the check can fail)
    w = jax.random.normal(jax.random.key(6), (batch * k, spec.n_qubits))

    def grads(f):
        return jax.jit(jax.grad(lambda x, t: (f(x, t, table) * w).sum(), (0, 1)))(x, theta)

    for ga, gb in zip(grads(frame.with_uniforms), grads(gates.with_uniforms), strict=True):
        np.testing.assert_allclose(ga, gb, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=str)
def test_mean_and_gradient_match_default_mixed(spec):
    """Pauli channels and readout: the trajectory mean and its theta gradient within 5 sigma of
    the density matrix's (central differences of default.mixed for the gradient)."""
    params = uniform(spec.n_qubits, PAULI)
    x, theta = _inputs(spec, 1, seed=1)
    xb, tb = np.asarray(x[0], np.float64), np.asarray(theta, np.float64)
    one = jax.jit(pauli_frame_circuit(spec, params, 1))
    keys = 4000
    z = np.asarray(one(jnp.tile(x, (keys, 1)), theta, jax.random.key(0)), np.float64)
    ref = mixed_z(spec, params, xb, tb)
    mean, sem = z.mean(0), z.std(0) / np.sqrt(keys)
    assert np.all(np.abs(mean - ref) < 5 * sem + 1e-4), (mean, ref, sem)
    exact = np.asarray(fast_circuit(spec)(x, theta))[0]
    assert np.abs(ref - exact).max() > 10 * sem.max()  # the noise moved the values

    w = np.array([1.0, -0.5, 0.3, 2.0, -1.0])[: spec.n_qubits]
    f = pauli_frame_circuit(spec, params, 50)
    grad = jax.grad(lambda t, key: (f(x, t, key)[0] * w).sum())
    draws = np.asarray(
        jax.jit(jax.vmap(grad, in_axes=(None, 0)))(theta, jax.random.split(jax.random.key(2), 40))
    ).reshape(40, -1)
    picked = [0, tb.size // 3, tb.size // 2, tb.size - 1]  # a few weights: default.mixed is slow
    draws = draws[:, picked]
    g_mean, g_sem = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    h = 1e-4
    want = []
    for i in picked:
        e = np.zeros(tb.size)
        e[i] = h
        up = mixed_z(spec, params, xb, tb + e.reshape(tb.shape))
        down = mixed_z(spec, params, xb, tb - e.reshape(tb.shape))
        want.append(((up - down) / (2 * h)) @ w)
    assert np.all(np.abs(g_mean - np.array(want)) < 5 * g_sem + 1e-3), (g_mean, want, g_sem)


def test_routing_keys_and_where_it_does_not_apply():
    spec = CircuitSpec(5, 2)
    opts = HeadConfig(name=HeadName.dqc, noise=NoiseConfig(depolarizing=0.05, trajectories=4))
    f = jax.jit(noisy_circuit(spec, fast_circuit(spec), opts))
    x, theta = _inputs(spec, 2)
    assert "qtl_statevector_forward" in f.lower(x, theta, jax.random.key(0)).as_text()
    a, b = f(x, theta, jax.random.key(3)), f(x, theta, jax.random.key(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, f(x, theta, jax.random.key(4)))
    # amplitude damping, a real circuit of fewer than 4 wires: the gate-by-gate path
    assert pauli_frame_circuit(spec, uniform(5, NoiseConfig(amplitude_damping=0.1)), 2) is None
    assert pauli_frame_circuit(CircuitSpec(3, 2), uniform(3, PAULI), 2) is None
    damped = HeadConfig(name=HeadName.dqc, noise=NoiseConfig(amplitude_damping=0.05))
    g = jax.jit(noisy_circuit(spec, fast_circuit(spec), damped))
    assert "qtl_statevector_forward" not in g.lower(x, theta, jax.random.key(0)).as_text()


def test_row_kernel_is_the_shared_kernel_row_by_row():
    """Layers given per row (here the same for every row) give the shared-layer kernel's
    outputs and, summed over rows, its layer gradients, bit for bit."""
    from qtl.quantum.fast import _layer_matrices, _zero_vectors

    spec = CircuitSpec(6, 3)
    plan, kernel = row_state_kernel(spec)
    x, theta = _inputs(spec, 4, seed=3)
    vectors = _zero_vectors(plan.prefix, 6, x, theta, jnp.float32)
    layers = [g for kind, g in plan.steps if kind == "local"]
    mats = jnp.stack([_layer_matrices(g, 6, x, theta, jnp.float32) for g in layers])
    rows = jnp.broadcast_to(mats, (4, *mats.shape))
    w = jax.random.normal(jax.random.key(1), (4, 6))
    step = jax.jit(jax.value_and_grad(lambda v, m: (kernel(v, m) * w).sum(), (0, 1)))
    shared, per_row = step(vectors, mats), step(vectors, rows)
    assert shared[0] == per_row[0]
    np.testing.assert_array_equal(shared[1][0], per_row[1][0])
    np.testing.assert_allclose(shared[1][1], per_row[1][1].sum(0), rtol=1e-5, atol=1e-6)


def test_clean_trajectories_run_once_per_example():
    """Trajectories without a Pauli are the noise-free circuit, run once per example: the mean
    and its gradients equal every row simulated (a capacity too small for the noisy rows falls
    back to that), and the mean of the per-trajectory values with the same uniforms."""
    spec = CircuitSpec(5, 2)
    params = uniform(5, NoiseConfig(depolarizing=0.01, readout=0.05))
    k, batch = 32, 4
    dedup = pauli_frame_circuit(spec, params, k)
    every = pauli_frame_circuit(spec, params, k, capacity=2)
    x, theta = _inputs(spec, batch, seed=4)
    key = jax.random.key(9)
    table = jax.random.uniform(key, (batch * k, dedup.events))
    assert 4 < int((table < 0.01).any(1).sum()) < batch * k // 2  # some rows, not most
    want = jax.jit(dedup.with_uniforms)(x, theta, table)
    want = np.asarray(want).reshape(batch, k, -1).mean(1)
    w = jax.random.normal(jax.random.key(1), (batch, 5))
    results = []
    for f in (dedup, every):
        val, grads = jax.jit(
            jax.value_and_grad(lambda a, t, f=f: (f(a, t, key) * w).sum(), (0, 1))
        )(x, theta)
        np.testing.assert_allclose(jax.jit(f)(x, theta, key), want, atol=2e-6)
        results.append((val, *grads))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
