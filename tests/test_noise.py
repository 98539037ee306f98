"""Shots and noise (qtl.quantum.shots, qtl.quantum.noise): unbiased shot estimates, the
trajectory mean against exact density matrices (PennyLane default.mixed per channel and mixed;
qiskit-aer on an IBM fake backend's model), the noise-free limit, reproducible draws."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_reference import aer_z, mixed_z

from qtl.config import Gradient, HeadConfig, HeadName, NoiseConfig
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.fast import fast_circuit
from qtl.quantum.noise import noisy_circuit
from qtl.quantum.noise.channels import uniform
from qtl.quantum.noise.trajectories import trajectory_circuit
from qtl.quantum.shots import sample_z

SPEC = CircuitSpec(4, 2)  # the DQC family at 4 qubits, 2 layers


def _inputs(spec: CircuitSpec, batch: int = 2, seed: int = 0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (batch, spec.n_qubits), minval=-1.5, maxval=1.5)
    return x, 2.0 * jax.random.normal(kt, spec.theta_shape)


@pytest.mark.parametrize("shots", [10, 100, 1000])
def test_shot_estimates_follow_the_binomial_law(shots):
    """Mean <Z> and variance (1 - <Z>^2)/S, each within 5 sigma of their sampling error."""
    z = jnp.array([-0.9, -0.3, 0.0, 0.5, 0.97])
    draws = 40_000
    est = sample_z(jnp.broadcast_to(z, (draws, 5)), shots, jax.random.key(shots))
    est = np.asarray(est, np.float64)
    var = (1 - np.asarray(z, np.float64) ** 2) / shots
    assert np.all(np.abs(est.mean(0) - np.asarray(z)) < 5 * np.sqrt(var / draws) + 1e-6)
    # the variance of a sample variance: (mu4 - var^2) / N; mu4 of a scaled binomial
    p = (1 - np.asarray(z, np.float64)) / 2
    pq = p * (1 - p)
    mu4 = 16 * pq * (1 + 3 * (shots - 2) * pq) / shots**3  # (2/S)^4 S pq (1 + 3 (S-2) pq)
    bound = 5 * np.sqrt((mu4 - var**2).clip(min=0) / draws)
    assert np.all(np.abs(est.var(0) - var) < bound + 1e-7), (est.var(0), var)
    # and the estimates are on the grid of S bitstrings
    ones = (1 - est) * shots / 2
    assert np.allclose(ones, np.round(ones), atol=1e-3)


def test_exact_options_build_nothing_and_noise_free_trajectories_equal_the_simulator():
    spec = CircuitSpec(5, 2, "ring", "rz_ry")
    exact = fast_circuit(spec)
    assert noisy_circuit(spec, exact, HeadConfig(name=HeadName.dqc)) is None
    x, theta = _inputs(spec, 3)
    traj = jax.jit(trajectory_circuit(spec, uniform(5, NoiseConfig()), 2))(
        x, theta, jax.random.key(1)
    )
    np.testing.assert_allclose(traj, exact(x, theta), atol=2e-6)


def test_same_key_same_draws_other_key_other_draws():
    opts = HeadConfig(name=HeadName.dqc, shots=100, noise=NoiseConfig(depolarizing=0.05))
    f = jax.jit(noisy_circuit(SPEC, fast_circuit(SPEC), opts))
    x, theta = _inputs(SPEC)
    a, b = f(x, theta, jax.random.key(3)), f(x, theta, jax.random.key(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, f(x, theta, jax.random.key(4)))


@pytest.mark.parametrize("gradient", [Gradient.adjoint, Gradient.parameter_shift])
def test_gradients_under_shots_estimate_the_exact_gradient(gradient):
    """Both gradients average (over keys) to the exact one; parameter shift within 5 sigma of
    its own spread, adjoint (exact Jacobian at a sampled forward) exactly for a linear loss."""
    opts = HeadConfig(name=HeadName.dqc, shots=2000, gradient=gradient)
    exact = fast_circuit(SPEC)
    f = noisy_circuit(SPEC, exact, opts)
    x, theta = _inputs(SPEC)
    w = jnp.array([1.0, -0.5, 0.3, 2.0])

    def loss(fn, t, *key):
        return (fn(x, t, *key) * w).sum()

    want = np.asarray(jax.grad(lambda t: loss(exact, t))(theta))
    keys = jax.random.split(jax.random.key(7), 48)
    grad = jax.grad(lambda t, k: loss(f, t, k))
    grads = np.asarray(jax.jit(jax.vmap(grad, in_axes=(None, 0)))(theta, keys))
    if gradient == Gradient.adjoint:
        np.testing.assert_allclose(grads[0], want, rtol=1e-5, atol=1e-5)
    sem = grads.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(grads.mean(0) - want) < 5 * sem + 1e-5)
    if gradient == Gradient.parameter_shift:
        assert sem.max() > 0  # the shifted circuits were sampled


def _per_trajectory(spec, params, x, theta, count: int, seed: int = 0) -> np.ndarray:
    """(count, B, n) single-trajectory <Z> (readout included) of each example."""
    f = trajectory_circuit(spec, params, 1, max_state_mb=4.0)
    rows = jnp.tile(x, (count, 1))
    z = jax.jit(f)(rows, theta, jax.random.key(seed))
    return np.asarray(z, np.float64).reshape(count, *x.shape)


CHANNELS = {
    "depolarizing": NoiseConfig(depolarizing=0.08, depolarizing_2q=0.0),
    "depolarizing_2q": NoiseConfig(depolarizing_2q=0.15),
    "amplitude_damping": NoiseConfig(amplitude_damping=0.12),
    "phase_damping": NoiseConfig(phase_damping=0.2),
    "readout": NoiseConfig(readout=0.07),
    "mixed": NoiseConfig(
        depolarizing=0.03,
        depolarizing_2q=0.06,
        amplitude_damping=0.05,
        phase_damping=0.04,
        readout=0.02,
    ),
}


@pytest.mark.parametrize("name", list(CHANNELS))
def test_trajectory_mean_matches_default_mixed(name):
    """Each channel, and all at once, within 5 sigma of the trajectory estimate (n = 4)."""
    spec = CircuitSpec(3, 2, "ring", "rz_ry")  # complex amplitudes: RZ, and Y errors
    params = uniform(3, CHANNELS[name])
    x, theta = _inputs(spec, 2, seed=1)
    z = _per_trajectory(spec, params, x, theta, 3000)
    mean, sem = z.mean(0), z.std(0) / np.sqrt(z.shape[0])
    for b in range(x.shape[0]):
        ref = mixed_z(spec, params, np.asarray(x[b], np.float64), np.asarray(theta, np.float64))
        assert np.all(np.abs(mean[b] - ref) < 5 * sem[b] + 1e-4), (name, mean[b], ref, sem[b])
    exact = np.asarray(fast_circuit(spec)(x, theta))
    if name != "phase_damping":  # the channel moved the values (the check can fail)
        assert np.abs(mean - exact).max() > 10 * sem.max()


needs_qiskit = pytest.mark.skipif(
    importlib.util.find_spec("qiskit_aer") is None
    or importlib.util.find_spec("qiskit_ibm_runtime") is None,
    reason="the noise extra (qiskit-aer, qiskit-ibm-runtime) is not installed",
)


@needs_qiskit
def test_fake_backend_model_matches_qiskit_aer_density_matrix():
    """fake_manila's calibration through qtl's mapping, exact (default.mixed) against aer's
    NoiseModel.from_backend on its density matrix; and the trajectory mean against both."""
    from qtl.quantum.noise.device_models import device_params

    spec = CircuitSpec(4, 3, "chain", "ry")  # chain: every CNOT on a coupled pair of manila
    params = device_params("fake_manila", 4)
    assert params.source["snapshot_date"]
    gate_only = uniform(4, NoiseConfig())
    gate_only = type(params)(
        **{
            **params.__dict__,
            "readout_01": gate_only.readout_01,
            "readout_10": gate_only.readout_10,
        }
    )
    x, theta = _inputs(spec, 2, seed=2)
    exact = np.asarray(fast_circuit(spec)(x, theta), np.float64)
    for b in range(2):
        xb, tb = np.asarray(x[b], np.float64), np.asarray(theta, np.float64)
        ours = mixed_z(spec, gate_only, xb, tb)
        aer = aer_z(spec, "fake_manila", xb, tb)
        effect = np.abs(aer - exact[b]).max()
        assert effect > 5e-3  # the device's noise is visible
        assert np.abs(ours - aer).max() < 0.1 * effect + 5e-4, (ours, aer, exact[b])
    z = _per_trajectory(spec, gate_only, x, theta, 3000)
    mean, sem = z.mean(0), z.std(0) / np.sqrt(z.shape[0])
    ref = np.stack(
        [
            mixed_z(spec, gate_only, np.asarray(x[b], np.float64), np.asarray(theta, np.float64))
            for b in range(2)
        ]
    )
    assert np.all(np.abs(mean - ref) < 5 * sem + 1e-4)


def test_noise_settings_are_identity_and_records_without_them_resume():
    from conftest import TINY, compose

    from qtl.record.identity import fingerprint, identity, identity_diffs

    exact = compose(*TINY, "head=dqc")
    noisy = compose(*TINY, "head=dqc", "head.shots=1000", "head.noise.depolarizing=0.01")
    new = ("head.noise.", "head.shots", "head.gradient", "model.circuit.noise.")
    old = {k: v for k, v in identity(exact).items() if not k.startswith(new)}
    assert identity_diffs(exact, old, identity(exact)) == []  # an old run resumes as exact
    diffs = " ".join(identity_diffs(noisy, old, identity(noisy)))
    assert "head.shots" in diffs and "head.noise.depolarizing" in diffs
    assert fingerprint(exact) != fingerprint(noisy)


def test_head_and_quantum_layer_draw_new_keys_every_call():
    from flax import nnx

    from qtl.models.heads import DQCHead
    from qtl.quantum.layer import QuantumLayer, QuantumLayerConfig

    cfg = HeadConfig(name=HeadName.dqc, depth=1, shots=64)
    head = DQCHead(6, 3, cfg, rngs=nnx.Rngs(params=0))
    feats = jnp.ones((2, 6))
    a, b = head(feats), head(feats)
    assert not np.array_equal(a, b)  # the head's key stream advanced
    exact = DQCHead(6, 3, HeadConfig(name=HeadName.dqc, depth=1), rngs=nnx.Rngs(params=0))
    assert exact.noisy is None
    np.testing.assert_array_equal(exact.theta[...], head.theta[...])  # same seed, same init
    layer = QuantumLayer(4, QuantumLayerConfig(shots=50), rngs=nnx.Rngs(params=1))
    z = np.asarray(layer(jnp.full((3, 4), 0.3)))
    ones = (1 - z) * 50 / 2
    assert np.allclose(ones, np.round(ones), atol=1e-3)  # estimates from 50 bitstrings


def test_bench_circuit_noise_cases_expand_and_unknown_ones_are_refused():
    from qtl.bench.circuit import _noise_case, _validate, noise_cases
    from qtl.config import BenchCircuitConfig, ConfigError

    cfg = BenchCircuitConfig(qubits=[14, 19], noise_cases=["shots", "trajectories"], rounds=1)
    labels = [label for _, n, label in noise_cases(cfg) if n == 19]
    assert labels == ["fast+forward", "fast+shots1000+forward", "fast+depolarizing+K8"]
    assert _noise_case(cfg, "fast+shots1000+forward") == {"forward_only": True, "shots": 1000}
    traj = _noise_case(cfg, "fast+depolarizing+K8")
    assert traj == {"forward_only": False, "depolarizing": 0.001, "trajectories": 8}
    with pytest.raises(ConfigError, match="bench_circuit.noise_cases"):
        _validate(BenchCircuitConfig(noise_cases=["crosstalk"]))


def test_trajectory_gradients_are_finite_with_every_channel():
    """Amplitude damping renormalises by branch: no NaN from the branch not taken."""
    params = uniform(3, CHANNELS["mixed"])
    spec = CircuitSpec(3, 2, "ring", "rz_ry")
    f = trajectory_circuit(spec, params, 16)
    x, theta = _inputs(spec, 4, seed=3)
    gx, gt = jax.jit(jax.grad(lambda a, t: f(a, t, jax.random.key(0)).sum(), (0, 1)))(x, theta)
    assert np.isfinite(gx).all() and np.isfinite(gt).all() and np.abs(gt).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "study,prefix",
    [
        (["head=dqc", "head.depth=1"], "head"),
        (["debug=tiny_medmnist", "model=qvit", "model.quantum=[q]"], "model.circuit"),
    ],
    ids=["dqc", "qvit"],
)
def test_a_noisy_run_trains_and_records_its_noise(study, prefix, synth_root, tmp_path):
    """The documented command, one epoch: shots, depolarizing noise and 8 trajectories per
    example train end to end and land in results.json with what produced them."""
    import json

    from conftest import TINY, compose

    from qtl.apps.train import train_and_evaluate

    base = TINY if study[0].startswith("head") else []
    noisy = [f"{prefix}.shots=1000", f"{prefix}.noise.depolarizing=0.01",
             f"{prefix}.noise.trajectories=8"]  # fmt: skip
    cfg = compose(*base, *study, f"data.root={synth_root}", "train.max_epochs=1", *noisy)
    train_and_evaluate(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    noise = results["quantum_noise"]
    assert noise["exact"] is False and noise["shots"] == 1000 and noise["trajectories"] == 8
    assert noise["channels"]["depolarizing"] == 0.01
    assert noise["channels"]["depolarizing_2q"] == 0.01  # null follows the one-qubit value
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 1 and np.isfinite([rows[0]["train_loss"], rows[0]["val_loss"]]).all()
