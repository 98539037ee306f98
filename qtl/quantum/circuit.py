"""The study's circuit, written once as a PennyLane quantum function.

Order (REFERENCE §1): on |0...0>, H then RY(x_i) on every wire; then `depth` times an
RY(theta[l, i]) layer followed by a CNOT ring 0->1, 1->2, ..., (n-1)->0; finally <Z_i> on
every wire. All gates are real, so the state vector stays real.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import pennylane as qml

# default.qubit asks for complex128 and JAX (x64 off) uses complex64: expected, not actionable.
warnings.filterwarnings("ignore", message="Explicitly requested dtype complex128")


def ring_pairs(n_qubits: int) -> list[tuple[int, int]]:
    """CNOT (control, target) pairs of the ring entangler, in application order."""
    if n_qubits < 2:
        raise ValueError(f"the CNOT ring needs at least 2 qubits, got {n_qubits}")
    return [(i, (i + 1) % n_qubits) for i in range(n_qubits)]


def dqc_ansatz(x: jax.Array, theta: jax.Array) -> None:
    """Queue the circuit's gates; ``x`` is (..., n) angles (a leading batch axis broadcasts)."""
    depth, n_qubits = theta.shape
    for wire in range(n_qubits):
        qml.Hadamard(wires=wire)
        qml.RY(x[..., wire], wires=wire)
    for layer in range(depth):
        for wire in range(n_qubits):
            qml.RY(theta[layer, wire], wires=wire)
        for control, target in ring_pairs(n_qubits):
            qml.CNOT(wires=[control, target])


def pennylane_circuit(n_qubits: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Reference simulator: default.qubit, jax interface, backprop (compiles under jax.jit).

    Returns ``f(x, theta) -> (B, n)`` expectation values <Z_i>.
    """
    device = qml.device("default.qubit", wires=n_qubits)

    @qml.qnode(device, interface="jax", diff_method="backprop")
    def qnode(x: jax.Array, theta: jax.Array) -> list:
        dqc_ansatz(x, theta)
        return [qml.expval(qml.PauliZ(wire)) for wire in range(n_qubits)]

    def run(x: jax.Array, theta: jax.Array) -> jax.Array:
        z = jnp.stack(qnode(x, theta), axis=-1)
        return z.astype(x.dtype)

    return run


def init_theta(key: jax.Array, depth: int, n_qubits: int, scheme: str) -> jax.Array:
    """Circuit weights: normal with std 2*pi (study's code) or uniform on [0, 2*pi)."""
    if scheme == "normal":
        return 2 * jnp.pi * jax.random.normal(key, (depth, n_qubits), jnp.float32)
    if scheme == "uniform":
        return jax.random.uniform(key, (depth, n_qubits), jnp.float32, 0.0, 2 * jnp.pi)
    raise ValueError(f"head.theta_init='{scheme}' is not one of: normal, uniform")
