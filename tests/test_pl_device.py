"""The circuit on a PennyLane device (``<circuit>.device``, qtl.quantum.device): <Z> and its
gradient equal qtl's fast simulator on exact devices (default.mixed, lightning.qubit,
qiskit.aer's statevector), for the DQC head's and the QViT layers' circuits; shots are
within their binomial spread and reproducible from the key; noise channels on default.mixed
equal the density-matrix reference; a tiny DQC run trains on lightning.qubit and records the
device, and mode=robustness on default.qubit reproduces its score; bad devices are one-line
errors naming the field."""

from __future__ import annotations

import csv
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noise_reference import mixed_z

from qtl.config import ConfigError, DeviceConfig, Gradient, HeadConfig, HeadName, NoiseConfig
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.device import check_device, check_name, device_circuit, runner
from qtl.quantum.fast import fast_circuit
from qtl.quantum.noise.channels import uniform

DQC = CircuitSpec(4, 2)  # the DQC head's family: H + RY encoding, RY layers, CNOT ring
QVIT = CircuitSpec(4, 2, "qvit_ring", "rx", "rx")  # the QViT layers': RX encoding and layers

needs_qiskit = pytest.mark.skipif(
    importlib.util.find_spec("pennylane_qiskit") is None,
    reason="the devices extra (pennylane-qiskit) is not installed",
)


def _opts(name: str, *, shots=None, gradient="adjoint", noise=None, **options) -> HeadConfig:
    return HeadConfig(
        name=HeadName.dqc,
        shots=shots,
        gradient=Gradient(gradient),
        noise=noise or NoiseConfig(),
        device=DeviceConfig(name=name, options=options),
    )


def _inputs(spec: CircuitSpec, batch: int = 3, seed: int = 0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (batch, spec.n_qubits), minval=-1.5, maxval=1.5)
    return x, jax.random.normal(kt, spec.theta_shape)


def _value_and_grads(f, x, theta, w, key):
    def loss(a, t):
        z = f(a, t, key)
        return (z * w).sum(), z

    (_, z), (gx, gt) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, theta)
    return np.asarray(z), np.asarray(gx), np.asarray(gt)


EXACT = [
    pytest.param("default.mixed", {}, id="default.mixed"),
    pytest.param("lightning.qubit", {}, id="lightning.qubit"),
    pytest.param("qiskit.aer", {"method": "statevector"}, marks=needs_qiskit, id="qiskit.aer"),
]


@pytest.mark.parametrize("spec", [DQC, QVIT], ids=["dqc", "qvit"])
@pytest.mark.parametrize(("name", "options"), EXACT)
def test_exact_device_value_and_gradient_equal_the_fast_simulator(spec, name, options):
    if name == "qiskit.aer" and spec is QVIT:
        pytest.skip("qiskit.aer: the DQC circuit covers it (each aer case takes ~10 s)")
    opts = _opts(name, **options)
    x, theta = _inputs(spec)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, spec.n_qubits)), jnp.float32)
    fast = fast_circuit(spec)
    want = _value_and_grads(lambda a, t, k: fast(a, t), x, theta, w, None)
    got = _value_and_grads(device_circuit(spec, opts), x, theta, w, jax.random.key(0))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(want[2]).max() > 1e-2  # the gradient is not trivially zero


def test_device_picks_its_own_gradient_and_parameter_shift_agrees():
    assert runner(DQC, _opts("lightning.qubit")).diff_method == "adjoint"
    assert runner(DQC, _opts("default.mixed")).diff_method == "backprop"
    shift = _opts("default.mixed", gradient="parameter_shift")
    assert runner(DQC, shift).diff_method == "parameter-shift"
    x, theta = _inputs(DQC)
    w = jnp.ones((3, 4), jnp.float32)
    a = _value_and_grads(device_circuit(DQC, shift), x, theta, w, jax.random.key(0))
    b = _value_and_grads(
        device_circuit(DQC, _opts("default.mixed")), x, theta, w, jax.random.key(0)
    )
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5)


@pytest.mark.parametrize("name", ["default.qubit", "lightning.qubit"])
def test_device_shots_are_within_their_spread_and_follow_the_key(name):
    shots = 400
    opts = _opts(name, shots=shots)
    x, theta = _inputs(DQC, batch=8, seed=1)
    f = jax.jit(device_circuit(DQC, opts))
    exact = np.asarray(fast_circuit(DQC)(x, theta), np.float64)
    z = np.asarray(f(x, theta, jax.random.key(3)), np.float64)
    sigma = np.sqrt((1 - exact**2) / shots)
    assert np.all(np.abs(z - exact) <= 5 * sigma + 1e-6), np.abs(z - exact) / (sigma + 1e-9)
    ones = (1 - z) * shots / 2
    assert np.allclose(ones, np.round(ones), atol=1e-3)  # estimates from 400 bitstrings
    again = np.asarray(f(x, theta, jax.random.key(3)))
    other = np.asarray(f(x, theta, jax.random.key(4)))
    np.testing.assert_array_equal(z.astype(np.float32), again)
    assert not np.array_equal(again, other)


def test_noise_channels_on_default_mixed_equal_the_density_matrix_reference():
    noise = NoiseConfig(
        depolarizing=0.03, depolarizing_2q=0.06, amplitude_damping=0.05, phase_damping=0.04
    )
    spec = CircuitSpec(3, 2, "ring", "rz_ry")
    x, theta = _inputs(spec, batch=2, seed=2)
    readout = NoiseConfig(**{**noise.__dict__, "readout": 0.02})
    for name, cfg in (("default.mixed", readout), ("lightning.qubit", NoiseConfig(readout=0.02))):
        z = np.asarray(device_circuit(spec, _opts(name, noise=cfg))(x, theta, jax.random.key(0)))
        params = uniform(3, cfg)
        for b in range(2):
            xb, tb = np.asarray(x[b], np.float64), np.asarray(theta, np.float64)
            np.testing.assert_allclose(z[b], mixed_z(spec, params, xb, tb), atol=1e-5)
    exact = np.asarray(fast_circuit(spec)(x, theta))
    assert np.abs(z - exact).max() > 1e-3  # the channels moved the values


@needs_qiskit
def test_qiskit_aer_samples_and_records_its_plugin():
    opts = _opts("qiskit.aer", shots=2000)
    x, theta = _inputs(DQC, batch=4, seed=5)
    z = np.asarray(device_circuit(DQC, opts)(x, theta, jax.random.key(1)), np.float64)
    exact = np.asarray(fast_circuit(DQC)(x, theta), np.float64)
    assert np.all(np.abs(z - exact) <= 5 * np.sqrt((1 - exact**2) / 2000) + 1e-6)
    rec = runner(DQC, opts).record()
    assert rec["name"] == "qiskit.aer" and rec["plugin"].lower() == "pennylane-qiskit"
    assert rec["shots"] == 2000 and rec["plugin_version"]


def test_quantum_layer_runs_on_a_device():
    from flax import nnx

    from qtl.quantum.layer import QuantumLayer, QuantumLayerConfig

    cfg = QuantumLayerConfig(layers=2, device=DeviceConfig(name="lightning.qubit"))
    layer = QuantumLayer(4, cfg, rngs=nnx.Rngs(params=0))
    ref = QuantumLayer(4, QuantumLayerConfig(layers=2), rngs=nnx.Rngs(params=0))
    x = jax.random.uniform(jax.random.key(1), (2, 3, 4), minval=-1.0, maxval=1.0)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(ref(x)), atol=1e-5)

    def loss(model, a):
        return (model(a) ** 2).sum()

    g = nnx.grad(loss)(layer, x).weights[...]
    g_ref = nnx.grad(loss)(ref, x).weights[...]
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5)


def test_bad_devices_are_one_line_errors_naming_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"head.device.name='nosuch.qubit'.*default.mixed"):
        check_name("nosuch.qubit", "head.device.name")
    with pytest.raises(ConfigError, match=r"head.device.name='lightning.qubit' cannot run"):
        check_device(DQC, _opts("lightning.qubit", noise=NoiseConfig(depolarizing=0.01)), "head")
    with pytest.raises(ConfigError, match=r"head.device.options.token: credentials"):
        check_device(DQC, _opts("default.mixed", token="abc"), "head")
    with pytest.raises(ConfigError, match=r"head.device.options.wires"):
        check_device(DQC, _opts("default.mixed", wires=3), "head")
    with pytest.raises(ConfigError, match=r"head.shots=0"):
        check_device(DQC, _opts("default.mixed", shots=0), "head")
    with pytest.raises(ConfigError, match=r"model.circuit.device.*30 qubits"):
        check_device(CircuitSpec(30, 1), _opts("default.mixed"), "model.circuit")
    # a qiskit device without its plugin: the message names the extra
    import qtl.quantum.device as device

    plugins = {k: v for k, v in device._plugin_devices().items() if not k.startswith("qiskit")}
    monkeypatch.setattr(device, "_plugin_devices", lambda: plugins)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pennylane_qiskit" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"head.device.name='qiskit.aer' needs the 'devices'"):
        check_name("qiskit.aer", "head.device.name")


@pytest.mark.slow
def test_tiny_dqc_run_on_lightning_records_the_device_and_robustness_takes_one(
    synth_root, tmp_path
):
    """lightning.qubit (adjoint VJP): default.mixed costs ~25 s per batch of 32 at n = 8
    (docs/noise.md), too slow to train even the tiny run here."""
    from conftest import TINY, compose

    from qtl.apps.train import train_and_evaluate
    from qtl.record.identity import fingerprint

    over = [*TINY, f"data.root={synth_root}", "head=dqc", "head.depth=1", "train.max_epochs=1"]
    cfg = compose(*over, "head.device.name=lightning.qubit")
    train_and_evaluate(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    device = results["quantum_noise"]["device"]
    assert device["name"] == "lightning.qubit" and device["diff_method"] == "adjoint"
    assert 0.0 <= results["auroc"]["test"]["mean"] <= 1.0
    # a device run is another experiment: its own identity and fingerprint
    assert fingerprint(cfg) != fingerprint(compose(*over))
    # mode=robustness on another exact device reproduces the recorded score
    from qtl.apps.robustness import main as robustness_main

    out = tmp_path / "robust"
    rob = compose(
        "mode=robustness",
        f"robustness.runs={tmp_path / 'run'}",
        "robustness.shots=[null]",
        "robustness.depolarizing=[0]",
        "robustness.device.name=default.qubit",
        f"robustness.out={out}",
    )
    assert robustness_main(rob, None)["failed"] == []
    with (out / "robustness.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["circuit"] == "head on default.qubit"
    assert float(row["auroc"]) == pytest.approx(results["auroc"]["test"]["mean"], abs=1e-5)
