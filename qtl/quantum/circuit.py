"""The circuit family of both studies, written once as a PennyLane quantum function.

The chest X-ray study's DQC circuit (Chan et al., §III) is the default: on |0...0>, H then RY(x_i)
on every wire; then `depth` times a rotation layer RY(theta[l, i]) followed by a CNOT ring
0->1, 1->2, ..., (n-1)->0; finally <Z_i> on every wire. Variants change the encoding
(h_ry | rx | ry), the entangler (ring | chain | even_odd | qvit_ring) or the trainable
rotation (ry | rx | rz_ry). The QViT's quantum layers (Comajoan Cara et al.'s design) are the member
encoding=rx, rotation=rx, entangler=qvit_ring: raw features as RX angles, no Hadamards, and a
ring that is a single CNOT on two wires. Every simulator runs this one definition: PennyLane
executes it, and ``qtl.quantum.fast`` compiles its recorded tape.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl.config import ConfigError

if TYPE_CHECKING:
    import pennylane as qml

# PennyLane is imported where a circuit is built or recorded, not with this module: its import
# takes ~2 s (it loads matplotlib and SciPy), which a classical head's run never needs.

# default.qubit asks for complex128 and JAX (x64 off) uses complex64: expected, not actionable.
warnings.filterwarnings("ignore", message="Explicitly requested dtype complex128")

ENTANGLERS = ("ring", "chain", "even_odd")  # the DQC head's choices
# qvit_ring: the ring for d > 2 wires, one CNOT 0->1 for d = 2 (the public QViT design's)
ALL_ENTANGLERS = (*ENTANGLERS, "qvit_ring")
ROTATIONS = ("ry", "rx", "rz_ry")
# h_ry: H then RY(x) (the DQC's); rx | ry: one rotation by the raw feature (the QViT's is rx)
ENCODINGS = ("h_ry", "rx", "ry")


@dataclass(frozen=True)
class CircuitSpec:
    """Which member of the family: qubit count, layers, entangler, rotation and encoding."""

    n_qubits: int
    depth: int = 3
    entangler: str = "ring"  # ring | chain | even_odd | qvit_ring
    rotation: str = "ry"  # ry | rx | rz_ry (RZ then RY: two angles per wire)
    encoding: str = "h_ry"  # h_ry | rx | ry

    def __post_init__(self) -> None:
        if self.entangler not in ALL_ENTANGLERS:
            raise ValueError(
                f"entangler='{self.entangler}' is not one of: {', '.join(ALL_ENTANGLERS)}"
            )
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation='{self.rotation}' is not one of: {', '.join(ROTATIONS)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding='{self.encoding}' is not one of: {', '.join(ENCODINGS)}")
        if self.n_qubits < 2:
            raise ValueError(f"the circuit needs at least 2 qubits, got {self.n_qubits}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def theta_shape(self) -> tuple[int, ...]:
        """Shape of the trainable angles: one per wire and layer (two for rz_ry)."""
        if self.rotation == "rz_ry":
            return (self.depth, self.n_qubits, 2)
        return (self.depth, self.n_qubits)

    @property
    def is_real(self) -> bool:
        """True when every gate is real (H, RY, CNOT), so amplitudes need no imaginary part."""
        return self.rotation == "ry" and self.encoding in ("h_ry", "ry")


def ring_pairs(n_qubits: int) -> list[tuple[int, int]]:
    """CNOT (control, target) pairs of the ring entangler, in application order."""
    if n_qubits < 2:
        raise ValueError(f"the CNOT ring needs at least 2 qubits, got {n_qubits}")
    return [(i, (i + 1) % n_qubits) for i in range(n_qubits)]


def entangler_pairs(kind: str, n_qubits: int) -> list[tuple[int, int]]:
    """CNOT (control, target) pairs of one entangling layer, in application order.

    ring: 0->1, ..., (n-2)->(n-1), (n-1)->0 (the study's; for n=2 the wrap is a second CNOT 1->0);
    chain: the ring without the wrap; even_odd: 0->1, 2->3, ... then 1->2, 3->4, ...;
    qvit_ring: the ring, except a single CNOT 0->1 on two wires.
    """
    if kind == "ring":
        return ring_pairs(n_qubits)
    if kind == "qvit_ring":
        return [(0, 1)] if n_qubits == 2 else ring_pairs(n_qubits)
    if kind == "chain":
        return [(i, i + 1) for i in range(n_qubits - 1)]
    if kind == "even_odd":
        even = [(i, i + 1) for i in range(0, n_qubits - 1, 2)]
        odd = [(i, i + 1) for i in range(1, n_qubits - 1, 2)]
        return even + odd
    raise ValueError(f"entangler='{kind}' is not one of: {', '.join(ALL_ENTANGLERS)}")


def _rotation(kind: str, angles: Any, wire: int) -> None:
    import pennylane as qml

    if kind == "ry":
        qml.RY(angles, wires=wire)
    elif kind == "rx":
        qml.RX(angles, wires=wire)
    else:  # rz_ry
        qml.RZ(angles[..., 0], wires=wire)
        qml.RY(angles[..., 1], wires=wire)


def dqc_ansatz(x: Any, theta: Any, spec: CircuitSpec) -> None:
    """Queue the circuit's gates; ``x`` is (..., n) angles (a leading batch axis broadcasts)."""
    import pennylane as qml

    pairs = entangler_pairs(spec.entangler, spec.n_qubits)
    for wire in range(spec.n_qubits):
        if spec.encoding == "h_ry":
            qml.Hadamard(wires=wire)
            qml.RY(x[..., wire], wires=wire)
        elif spec.encoding == "ry":
            qml.RY(x[..., wire], wires=wire)
        else:  # rx
            qml.RX(x[..., wire], wires=wire)
    for layer in range(spec.depth):
        for wire in range(spec.n_qubits):
            _rotation(spec.rotation, theta[layer, wire], wire)
        for control, target in pairs:
            qml.CNOT(wires=[control, target])


@dataclass(frozen=True)
class Symbol:
    """A named placeholder parameter: ('x', (i,)) or ('theta', (layer, wire[, k]))."""

    array: str
    index: tuple[int, ...]


def record_tape(spec: CircuitSpec) -> qml.tape.QuantumScript:
    """The ansatz's gate list with :class:`Symbol` parameters, for compiling simulators."""
    import pennylane as qml

    x = np.empty(spec.n_qubits, dtype=object)
    for i in range(spec.n_qubits):
        x[i] = Symbol("x", (i,))
    theta = np.empty(spec.theta_shape, dtype=object)
    for index in np.ndindex(*spec.theta_shape):
        theta[index] = Symbol("theta", index)
    with qml.queuing.AnnotatedQueue() as queue:
        dqc_ansatz(x, theta, spec)
    return qml.tape.QuantumScript.from_queue(queue)


def pennylane_circuit(spec: CircuitSpec) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Reference simulator: default.qubit, jax interface, backprop (compiles under jax.jit).

    Returns ``f(x, theta) -> (B, n)`` expectation values <Z_i>.
    """
    import pennylane as qml

    device = qml.device("default.qubit", wires=spec.n_qubits)

    @qml.qnode(device, interface="jax", diff_method="backprop")
    def qnode(x: jax.Array, theta: jax.Array) -> list:
        dqc_ansatz(x, theta, spec)
        return [qml.expval(qml.PauliZ(wire)) for wire in range(spec.n_qubits)]

    def run(x: jax.Array, theta: jax.Array) -> jax.Array:
        z = jnp.stack(qnode(x, theta), axis=-1)
        return z.astype(x.dtype)

    return run


def init_theta(key: jax.Array, shape: tuple[int, ...], scheme: str) -> jax.Array:
    """Circuit weights: normal with std 2*pi (study's code) or uniform on [0, 2*pi)."""
    if scheme == "normal":
        return 2 * jnp.pi * jax.random.normal(key, shape, jnp.float32)
    if scheme == "uniform":
        return jax.random.uniform(key, shape, jnp.float32, 0.0, 2 * jnp.pi)
    raise ConfigError(f"head.theta_init='{scheme}' is not one of: normal, uniform")
