"""The circuit family of both studies, written once as a gate list that PennyLane runs.

The chest X-ray study's DQC circuit (Chan et al., §III) is the default: on |0...0>, H then RY(x_i)
on every wire; then `depth` times a rotation layer RY(theta[l, i]) followed by a CNOT ring
0->1, 1->2, ..., (n-1)->0; finally <Z_i> on every wire. Variants change the encoding
(h_ry | rx | ry), the entangler (ring | chain | even_odd | qvit_ring) or the trainable
rotation (ry | rx | rz_ry). The QViT's quantum layers (Comajoan Cara et al.'s design) are the member
encoding=rx, rotation=rx, entangler=qvit_ring: raw features as RX angles, no Hadamards, and a
ring that is a single CNOT on two wires. Every simulator runs this one definition, a plain gate
list (:func:`circuit_gates`): PennyLane executes it, and ``qtl.quantum.fast`` compiles it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import jax
import jax.numpy as jnp

from qtl.config import ConfigError

# PennyLane is imported only where it runs a circuit, not with this module: its import takes
# ~2-3 s, which a run on a classical head or on qtl's own simulators never needs.

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


@dataclass(frozen=True)
class Symbol:
    """A named placeholder parameter: ('x', (i,)) or ('theta', (layer, wire[, k]))."""

    array: str
    index: tuple[int, ...]


@dataclass(frozen=True)
class Gate:
    """One gate of the circuit: its PennyLane operation name, wires, and angle (None: fixed)."""

    name: str  # Hadamard | RX | RY | RZ | CNOT
    wires: tuple[int, ...]
    param: Symbol | None = None


@cache
def circuit_gates(spec: CircuitSpec) -> tuple[Gate, ...]:
    """The circuit as a gate list with :class:`Symbol` angles: its one definition.

    PennyLane runs it through :func:`dqc_ansatz`; the fast, noisy and TensorFlow simulators
    compile it. Plain data, so a run on ``fast`` never imports PennyLane (~2-3 s: it loads
    SciPy, NetworkX and its own JAX interface)."""
    n = spec.n_qubits
    gates: list[Gate] = []
    for wire in range(n):
        x = Symbol("x", (wire,))
        if spec.encoding == "h_ry":
            gates += [Gate("Hadamard", (wire,)), Gate("RY", (wire,), x)]
        else:  # ry | rx: one rotation by the raw feature
            gates.append(Gate(spec.encoding.upper(), (wire,), x))
    pairs = entangler_pairs(spec.entangler, n)
    for layer in range(spec.depth):
        for wire in range(n):
            if spec.rotation == "rz_ry":
                gates.append(Gate("RZ", (wire,), Symbol("theta", (layer, wire, 0))))
                gates.append(Gate("RY", (wire,), Symbol("theta", (layer, wire, 1))))
            else:
                gates.append(Gate(spec.rotation.upper(), (wire,), Symbol("theta", (layer, wire))))
        gates += [Gate("CNOT", pair) for pair in pairs]
    return tuple(gates)


def dqc_ansatz(x: Any, theta: Any, spec: CircuitSpec) -> None:
    """Queue the circuit's gates in PennyLane; ``x`` is (..., n) angles (a leading batch axis
    broadcasts)."""
    import pennylane as qml

    for gate in circuit_gates(spec):
        op = getattr(qml, gate.name)
        if gate.param is None:
            op(wires=list(gate.wires))
            continue
        sym = gate.param
        angle = x[..., sym.index[0]] if sym.array == "x" else theta[sym.index]
        op(angle, wires=gate.wires[0])


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
