"""Every simulator the circuit benchmark can time, each running the one circuit definition.

``fast`` and ``pennylane`` are qtl's own (``qtl.quantum``); ``tensorcircuit`` (tensorcircuit-ng,
jax backend, vmap over the batch) and ``lightning`` (PennyLane lightning.qubit, adjoint
gradients) are optional comparisons. The tensorcircuit circuit is built by walking the same
recorded tape, so all four simulate exactly the gates of :func:`qtl.quantum.circuit.dqc_ansatz`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qtl.quantum.circuit import CircuitSpec, Symbol, dqc_ansatz, pennylane_circuit, record_tape

CircuitFn = Callable[[jax.Array, jax.Array], jax.Array]

# simulator -> the module that must be importable for it
REQUIRES = {
    "fast": "jax",
    "pennylane": "pennylane",
    "tensorcircuit": "tensorcircuit",
    "lightning": "pennylane_lightning",
}


def available(name: str) -> bool:
    """Whether the simulator's package is installed (checked without importing it)."""
    if name not in REQUIRES:
        raise ValueError(f"unknown simulator '{name}'; choose from: {', '.join(REQUIRES)}")
    return importlib.util.find_spec(REQUIRES[name]) is not None


def make(
    name: str, spec: CircuitSpec, max_state_mb: float | None = None, native: bool = True
) -> CircuitFn:
    """``f(x (B, n), theta) -> <Z> (B, n)`` for the named simulator."""
    if name == "fast":
        from qtl.quantum.fast import fast_circuit

        return fast_circuit(spec, max_state_mb=max_state_mb, native=native)
    if name == "pennylane":
        return pennylane_circuit(spec)
    if name == "tensorcircuit":
        return _tensorcircuit(spec)
    if name == "lightning":
        return _lightning(spec)
    raise ValueError(f"unknown simulator '{name}'; choose from: {', '.join(REQUIRES)}")


def _tensorcircuit(spec: CircuitSpec) -> CircuitFn:
    import tensorcircuit as tc

    tc.set_backend("jax")
    tc.set_dtype("complex64")
    ops = record_tape(spec).operations

    def value(sym: Symbol, x: jax.Array, theta: jax.Array) -> jax.Array:
        return x[sym.index[0]] if sym.array == "x" else theta[sym.index]

    def one(x: jax.Array, theta: jax.Array) -> jax.Array:
        c = tc.Circuit(spec.n_qubits)
        for op in ops:
            wires = op.wires.tolist()
            if op.name == "CNOT":
                c.cnot(*wires)
            elif op.name == "Hadamard":
                c.h(wires[0])
            else:
                sym = op.parameters[0]
                sym = sym.item() if hasattr(sym, "item") else sym
                getattr(c, op.name.lower())(wires[0], theta=value(sym, x, theta))
        return jnp.stack([jnp.real(c.expectation_ps(z=[i])) for i in range(spec.n_qubits)])

    batched = jax.vmap(one, in_axes=(0, None))
    return lambda x, theta: batched(x, theta).astype(x.dtype)


def _lightning(spec: CircuitSpec) -> CircuitFn:
    import pennylane as qml

    device = qml.device("lightning.qubit", wires=spec.n_qubits)

    @qml.qnode(device, interface="jax", diff_method="adjoint")
    def qnode(x: jax.Array, theta: jax.Array) -> list:
        dqc_ansatz(x, theta, spec)
        return [qml.expval(qml.PauliZ(w)) for w in range(spec.n_qubits)]

    return lambda x, theta: jnp.stack(qnode(x, theta), axis=-1).astype(x.dtype)
