"""simulator=fast equals PennyLane default.qubit in complex128: outputs and gradients.

Every supported variant (entangler x rotation), n in {2, 3, 5, 8, 13, 14}, depth in {1, 3},
random inputs and weights, batch > 1. The reference runs in float64 (x64 on); fast runs its
float32 path under jit, as in training. Gradients are those of the dressed head's BCE with
respect to the input features, theta and both Linear layers.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pennylane as qml
import pytest
from flax import nnx

from qtl.config import HeadConfig, HeadName, Simulator
from qtl.models.heads import DQCHead
from qtl.quantum.circuit import (
    ENTANGLERS,
    ROTATIONS,
    CircuitSpec,
    dqc_ansatz,
    entangler_pairs,
    ring_pairs,
)
from qtl.quantum.dressed import head_loss, init_params
from qtl.quantum.fast import (
    cnot_network_matrix,
    fast_circuit,
    gf2_index,
    network_indices,
    wire_groups,
)

ATOL = 1e-5
FEATURES = 6
VARIANTS = list(itertools.product(ENTANGLERS, ROTATIONS))


def test_ring_network_is_prefix_xor_with_wrap():
    m = cnot_network_matrix(4, ring_pairs(4))
    # out_k = b_0 ^ ... ^ b_k for k >= 1; out_0 = b_1 ^ ... ^ b_{n-1}
    np.testing.assert_array_equal(m, [[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("entangler", ENTANGLERS)
def test_network_gather_applies_each_cnot_in_order(entangler):
    """The on-device index map equals applying the CNOTs one by one to a state vector."""
    n = 5
    pairs = entangler_pairs(entangler, n)
    state = np.random.default_rng(0).normal(size=2**n)
    expected = state.copy()
    index = np.arange(2**n)
    for control, target in pairs:  # CNOT: |b> -> |b with target flipped if control set>
        flip = ((index >> (n - 1 - control)) & 1) << (n - 1 - target)
        expected = expected[index ^ flip]
    gather, inverse = network_indices(n, pairs)
    np.testing.assert_array_equal(state[np.asarray(gf2_index(n, gather))], expected)
    back = np.asarray(gf2_index(n, inverse))
    np.testing.assert_array_equal(expected[back], state)


def test_wire_groups_cover_every_wire_once():
    for n, size in [(19, 5), (24, 6), (3, 5), (13, 4)]:
        groups = wire_groups(n, size)
        wires = [w for start, k in groups for w in range(start, start + k)]
        assert wires == list(range(n)) and max(k for _, k in groups) <= size


def _case(spec: CircuitSpec, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    params = init_params(rng, spec, FEATURES)
    features = rng.normal(size=(batch, FEATURES))
    labels = (rng.uniform(size=(batch, spec.n_qubits)) < 0.3).astype(np.float64)
    return params, features, labels


def _pennylane_adjoint(spec: CircuitSpec):
    """The reference: PennyLane's lightning.qubit in complex128 with its own adjoint gradients.

    The same circuit as ``pennylane_circuit`` (default.qubit, backprop, run op by op through
    JAX); equal to default.qubit's adjoint within 2e-15 where compared (14 qubits, RZ-RY ring,
    depth 3) and ~8x faster there (C++ instead of NumPy), which keeps the grid's 13- and
    14-qubit cases affordable in every test run."""
    device = qml.device("lightning.qubit", wires=spec.n_qubits)

    @qml.qnode(device, interface="jax", diff_method="adjoint")
    def qnode(x, theta):
        dqc_ansatz(x, theta, spec)
        return [qml.expval(qml.PauliZ(w)) for w in range(spec.n_qubits)]

    return lambda x, theta: jnp.stack(qnode(x, theta), axis=-1)


def _reference(spec: CircuitSpec, params, features, labels):
    """Loss, gradients and <Z> from PennyLane in complex128 (x64)."""
    with jax.enable_x64(True):
        circuit = _pennylane_adjoint(spec)
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        f64, l64 = jnp.asarray(features, jnp.float64), jnp.asarray(labels, jnp.float64)
        value, grads = jax.value_and_grad(head_loss(circuit), argnums=(0, 1))(p64, f64, l64)
        angles = jnp.tanh(f64 @ p64["pre_w"] + p64["pre_b"]) * (np.pi / 2)
        z = circuit(angles, p64["theta"])
        return jax.tree.map(np.asarray, (value, grads, z))


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 14])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("entangler,rotation", VARIANTS)
def test_fast_equals_pennylane_float64(n, depth, entangler, rotation):
    spec = CircuitSpec(n, depth, entangler, rotation)
    params, features, labels = _case(spec, batch=3, seed=n * 100 + depth)
    ref_value, (ref_grads, ref_dfeat), ref_z = _reference(spec, params, features, labels)

    circuit = fast_circuit(spec)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    f32, l32 = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.float32)
    step = jax.jit(jax.value_and_grad(head_loss(circuit), argnums=(0, 1)))
    value, (grads, dfeat) = step(p32, f32, l32)
    angles = jnp.tanh(f32 @ p32["pre_w"] + p32["pre_b"]) * (np.pi / 2)
    z = jax.jit(circuit)(angles, p32["theta"])

    np.testing.assert_allclose(np.asarray(z), ref_z, atol=ATOL, err_msg="<Z>")
    np.testing.assert_allclose(float(value), ref_value, atol=ATOL, err_msg="loss")
    np.testing.assert_allclose(np.asarray(dfeat), ref_dfeat, atol=ATOL, err_msg="d/d features")
    for name in ("pre_w", "pre_b", "theta", "post_w", "post_b"):
        np.testing.assert_allclose(
            np.asarray(grads[name]), ref_grads[name], atol=ATOL, err_msg=f"d/d {name}"
        )


@pytest.mark.slow
def test_fast_equals_float64_pennylane_at_19_qubits():
    """The study's largest head: fast (float32, jit) against default.qubit in complex128."""
    spec = CircuitSpec(19, 3)
    rng = np.random.default_rng(19)
    x = rng.uniform(-np.pi / 2, np.pi / 2, (2, 19))
    theta = rng.normal(0, 2 * np.pi, spec.theta_shape)
    device = qml.device("default.qubit", wires=19)

    @qml.qnode(device, interface="numpy", diff_method=None)
    def reference(x, theta):
        dqc_ansatz(x, theta, spec)
        return [qml.expval(qml.PauliZ(w)) for w in range(19)]

    expected = np.stack(reference(x, theta), axis=-1)
    got = jax.jit(fast_circuit(spec))(jnp.asarray(x, jnp.float32), jnp.asarray(theta, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL)


def test_batch_splitting_changes_nothing():
    """max_state_mb forces chunks (with remat): same outputs and gradients as one pass."""
    spec = CircuitSpec(9, 3)
    params, features, labels = _case(spec, batch=7, seed=5)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    args = (p32, jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.float32))
    whole = jax.jit(jax.value_and_grad(head_loss(fast_circuit(spec))))(*args)
    tiny = fast_circuit(spec, max_state_mb=2 * 2**9 * 4 / 2**20)  # two states per chunk
    split = jax.jit(jax.value_and_grad(head_loss(tiny)))(*args)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_fast_rejects_inputs_after_the_first_entangler(monkeypatch):
    """Data re-uploading is not what the fast simulator was built for: say so, don't guess."""
    import qtl.quantum.fast as fast
    from qtl.quantum.circuit import Gate, Symbol, circuit_gates

    def reupload(spec):
        return (*circuit_gates(spec), Gate("RY", (0,), Symbol("x", (0,))))

    monkeypatch.setattr(fast, "circuit_gates", reupload)
    with pytest.raises(ValueError, match="before the first CNOT"):
        fast.compile_plan(CircuitSpec(3, 1))


def test_fast_refuses_more_qubits_than_int32_indices_allow():
    fast_circuit(CircuitSpec(30, 1))  # the largest supported: builds (nothing runs yet)
    with pytest.raises(ValueError, match="31 qubits is more than it supports"):
        fast_circuit(CircuitSpec(31, 1))


@pytest.mark.parametrize("n,depth", [(3, 3), (8, 3)])
def test_dqc_module_gradients_agree_between_simulators(n, depth):
    """Through the real nnx DQCHead: d(BCE)/d(every parameter and the input features)."""
    feats = jax.random.normal(jax.random.key(0), (4, 10))
    labels = (jax.random.uniform(jax.random.key(1), (4, n)) < 0.3).astype(jnp.float32)
    grads = {}
    for sim in (Simulator.fast, Simulator.pennylane):
        head = DQCHead(
            10, n, HeadConfig(name=HeadName.dqc, depth=depth, simulator=sim), rngs=nnx.Rngs(3)
        )
        graph, params = nnx.split(head)

        def loss(p, f, graph=graph):
            return optax.sigmoid_binary_cross_entropy(nnx.merge(graph, p)(f), labels).mean()

        grads[sim] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, feats)
    flat_fast = jax.tree_util.tree_leaves_with_path(grads[Simulator.fast])
    flat_ref = jax.tree_util.tree_leaves(grads[Simulator.pennylane])
    for (path, a), b in zip(flat_fast, flat_ref, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


# ----------------------------------------------------------------------------- QViT family
# The QViT's quantum layers: raw features as RX (or RY) angles with no Hadamards, RX/RY
# variational layers, the qvit_ring (one CNOT on two wires). Same float64 reference and
# tolerance as the grid above, on the gradient of a fixed linear read-out of <Z> w.r.t. the
# raw inputs and the weights.
QVIT_CASES = [  # (n, depth, encoding, rotation, entangler)
    (2, 1, "rx", "rx", "qvit_ring"),
    (3, 2, "rx", "rx", "qvit_ring"),
    (8, 1, "rx", "rx", "qvit_ring"),
    (8, 2, "rx", "rx", "qvit_ring"),
    (4, 2, "ry", "ry", "qvit_ring"),
    (5, 1, "rx", "ry", "ring"),
    (3, 2, "ry", "rx", "chain"),
    (4, 1, "ry", "rz_ry", "even_odd"),
]


def _readout_loss(circuit, readout):
    return lambda x, theta: jnp.sum(circuit(x, theta) * readout)


@pytest.mark.parametrize("n,depth,encoding,rotation,entangler", QVIT_CASES)
def test_qvit_family_fast_equals_pennylane_float64(n, depth, encoding, rotation, entangler):
    spec = CircuitSpec(n, depth, entangler, rotation, encoding)
    rng = np.random.default_rng(n * 10 + depth)
    x = rng.normal(0, 1.5, (5, n))  # raw features: no tanh, any sign and size
    theta = rng.normal(0, 1.0, spec.theta_shape)
    readout = rng.normal(size=(5, n))
    with jax.enable_x64(True):
        reference = _pennylane_adjoint(spec)
        args64 = (jnp.asarray(x, jnp.float64), jnp.asarray(theta, jnp.float64))
        ref_z = np.asarray(reference(*args64))
        ref_loss = _readout_loss(reference, jnp.asarray(readout))
        ref_grads = jax.grad(ref_loss, argnums=(0, 1))(*args64)
    circuit = fast_circuit(spec)
    args32 = (jnp.asarray(x, jnp.float32), jnp.asarray(theta, jnp.float32))
    z = jax.jit(circuit)(*args32)
    loss = _readout_loss(circuit, jnp.asarray(readout, jnp.float32))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args32)
    np.testing.assert_allclose(np.asarray(z), ref_z, atol=ATOL, err_msg="<Z>")
    for name, a, b in zip(("x", "theta"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, err_msg=f"d/d {name}")


@pytest.mark.parametrize(
    "n,depth,entangler",
    [
        (3, 2, "qvit_ring"),
        (8, 2, "qvit_ring"),
        (8, 4, "qvit_ring"),
        (6, 3, "ring"),
        (7, 2, "even_odd"),
    ],
)
def test_rx_cnot_phase_polynomial_equals_pennylane_float64(n, depth, entangler):
    """qtl.quantum.phase (``fast_circuit(phase=True)``): the same grid and tolerance, in
    float32 against PennyLane's float64, outputs and both gradients."""
    spec = CircuitSpec(n, depth, entangler, "rx", "rx")
    rng = np.random.default_rng(n * 100 + depth)
    x = rng.normal(0, 1.5, (5, n))
    theta = rng.normal(0, 1.0, spec.theta_shape)
    readout = rng.normal(size=(5, n))
    with jax.enable_x64(True):
        reference = _pennylane_adjoint(spec)
        args64 = (jnp.asarray(x, jnp.float64), jnp.asarray(theta, jnp.float64))
        ref_z = np.asarray(reference(*args64))
        ref_loss = _readout_loss(reference, jnp.asarray(readout))
        ref_grads = jax.grad(ref_loss, argnums=(0, 1))(*args64)
    circuit = fast_circuit(spec, phase=True)
    args32 = (jnp.asarray(x, jnp.float32), jnp.asarray(theta, jnp.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(circuit)(*args32)), ref_z, atol=ATOL)
    loss = _readout_loss(circuit, jnp.asarray(readout, jnp.float32))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args32)
    for name, a, b in zip(("x", "theta"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, err_msg=f"d/d {name}")


def _dense_reference(x: np.ndarray, theta: np.ndarray, n: int, pairs) -> np.ndarray:
    """RX(x) encoding, depth x [RX(theta) on every wire, CNOTs], <Z>: 2^n x 2^n matrices."""

    def rx(a):
        c, s = np.cos(a / 2), np.sin(a / 2)
        return np.array([[c, -1j * s], [-1j * s, c]])

    def on_all(mats):
        out = np.ones((1, 1))
        for m in mats:
            out = np.kron(out, m)
        return out

    def cnot(control, target):
        index = np.arange(2**n)
        flip = ((index >> (n - 1 - control)) & 1) << (n - 1 - target)
        return np.eye(2**n)[index ^ flip]

    state = np.zeros(2**n, complex)
    state[0] = 1
    state = on_all([rx(a) for a in x]) @ state
    for layer in theta:
        state = on_all([rx(a) for a in layer]) @ state
        for pair in pairs:
            state = cnot(*pair) @ state
    probs = np.abs(state) ** 2
    bits = (np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1
    return probs @ (1 - 2 * bits)


@pytest.mark.parametrize("n,depth", [(2, 1), (2, 3), (3, 2), (4, 1)])
def test_qvit_layer_circuit_equals_an_independent_dense_simulation(n, depth):
    """A third opinion that shares no code with PennyLane or fast: explicit matrices."""
    spec = CircuitSpec(n, depth, "qvit_ring", "rx", "rx")
    rng = np.random.default_rng(depth)
    x, theta = rng.normal(0, 2, (3, n)), rng.normal(0, 2, (depth, n))
    pairs = [(0, 1)] if n == 2 else [(i, (i + 1) % n) for i in range(n)]
    expected = np.stack([_dense_reference(row, theta, n, pairs) for row in x])
    got = jax.jit(fast_circuit(spec))(jnp.asarray(x, jnp.float32), jnp.asarray(theta, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL)


def test_qvit_ring_is_one_cnot_on_two_wires_and_the_ring_elsewhere():
    assert entangler_pairs("qvit_ring", 2) == [(0, 1)]
    assert entangler_pairs("ring", 2) == [(0, 1), (1, 0)]  # the DQC's ring is unchanged
    assert entangler_pairs("qvit_ring", 5) == ring_pairs(5)
    with pytest.raises(ValueError, match="encoding='rz' is not one of: h_ry, rx, ry"):
        CircuitSpec(4, 1, encoding="rz")


def test_qvit_family_batch_splitting_changes_nothing():
    """Complex state path (depth 2), many rows as images x tokens: chunks equal one pass."""
    spec = CircuitSpec(6, 2, "qvit_ring", "rx", "rx")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    readout = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)
    whole = fast_circuit(spec)
    tiny = fast_circuit(spec, max_state_mb=4 * 2**6 * 8 / 2**20)  # four states per chunk
    results = [
        jax.jit(jax.value_and_grad(_readout_loss(c, readout), argnums=(0, 1)))(x, theta)
        for c in (whole, tiny)
    ]
    for a, b in zip(*(jax.tree.leaves(r) for r in results), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
