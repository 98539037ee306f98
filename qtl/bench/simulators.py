"""Every simulator the circuit benchmark can time, each running the one circuit definition.

``fast`` and ``pennylane`` are qtl's own (``qtl.quantum``); ``tensorcircuit`` (tensorcircuit-ng,
jax backend, vmap over the batch), ``lightning`` (PennyLane lightning.qubit, adjoint
gradients) and ``qulacs`` (its C++ adjoint ``backprop``, one pass per example) are optional
peers. The tensorcircuit and qulacs circuits are built by walking the same gate list, so all
simulate exactly the gates of :func:`qtl.quantum.circuit.circuit_gates`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates, dqc_ansatz, pennylane_circuit

CircuitFn = Callable[[jax.Array, jax.Array], jax.Array]

# simulator -> the module that must be importable for it
REQUIRES = {
    "fast": "jax",
    "pennylane": "pennylane",
    "tensorcircuit": "tensorcircuit",
    "lightning": "pennylane_lightning",
    "qulacs": "qulacs",
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
    if name == "qulacs":
        return _qulacs(spec)
    raise ValueError(f"unknown simulator '{name}'; choose from: {', '.join(REQUIRES)}")


def _tensorcircuit(spec: CircuitSpec) -> CircuitFn:
    import tensorcircuit as tc

    tc.set_backend("jax")
    tc.set_dtype("complex64")
    ops = circuit_gates(spec)

    def value(sym: Symbol, x: jax.Array, theta: jax.Array) -> jax.Array:
        return x[sym.index[0]] if sym.array == "x" else theta[sym.index]

    def one(x: jax.Array, theta: jax.Array) -> jax.Array:
        c = tc.Circuit(spec.n_qubits)
        for op in ops:
            wires = op.wires
            if op.name == "CNOT":
                c.cnot(*wires)
            elif op.name == "Hadamard":
                c.h(wires[0])
            else:
                getattr(c, op.name.lower())(wires[0], theta=value(op.param, x, theta))
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


def _qulacs(spec: CircuitSpec) -> CircuitFn:
    """qulacs behind a ``jax.custom_vjp``: host callbacks for the forward pass and for the
    backward pass, where ``ParametricQuantumCircuit.backprop`` (adjoint differentiation) gives
    d(sum_i g_i <Z_i>)/d(every gate angle) in one pass per example."""
    import numpy as np
    from qulacs import Observable, ParametricQuantumCircuit, QuantumState

    n = spec.n_qubits
    circuit = ParametricQuantumCircuit(n)
    symbols: list[Symbol] = []  # the angle of each parametric gate, in qulacs' order
    for op in circuit_gates(spec):
        wires = op.wires
        if op.name == "CNOT":
            circuit.add_CNOT_gate(*wires)
        elif op.name == "Hadamard":
            circuit.add_H_gate(wires[0])
        elif op.name in ("RX", "RY", "RZ"):
            symbols.append(op.param)
            getattr(circuit, f"add_parametric_{op.name}_gate")(wires[0], 0.0)
        else:
            raise ValueError(f"qulacs peer: gate {op.name} is not mapped")
    # <Z_i> from the probabilities: sign[i, k] = 1 - 2 * (bit i of basis state k); qulacs
    # numbers qubit 0 as the least significant bit
    sign = 1.0 - 2.0 * ((np.arange(2**n)[None, :] >> np.arange(n)[:, None]) & 1)

    def load(x: np.ndarray, theta: np.ndarray) -> None:
        for k, sym in enumerate(symbols):
            angle = x[sym.index[0]] if sym.array == "x" else theta[sym.index]
            # qulacs rotates by exp(+i a P / 2), PennyLane by exp(-i a P / 2)
            circuit.set_parameter(k, -float(angle))

    def forward(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        x, theta = np.asarray(x, np.float64), np.asarray(theta, np.float64)
        out = np.empty(x.shape, np.float64)
        for b in range(x.shape[0]):
            load(x[b], theta)
            state = QuantumState(n)
            circuit.update_quantum_state(state)
            out[b] = sign @ (np.abs(state.get_vector()) ** 2)
        return out

    def backward(x: np.ndarray, theta: np.ndarray, g: np.ndarray) -> tuple:
        x, theta, g = (np.asarray(a, np.float64) for a in (x, theta, g))
        dx, dtheta = np.zeros_like(x), np.zeros_like(theta)
        for b in range(x.shape[0]):
            load(x[b], theta)
            obs = Observable(n)
            for i in range(n):
                obs.add_operator(float(g[b, i]), f"Z {i}")
            for sym, d in zip(symbols, circuit.backprop(obs), strict=True):
                if sym.array == "x":
                    dx[b, sym.index[0]] -= d
                else:
                    dtheta[sym.index] -= d
        return dx, dtheta

    @jax.custom_vjp
    def f(x: jax.Array, theta: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        cast = lambda x, t: forward(x, t).astype(x.dtype)  # noqa: E731
        return jax.pure_callback(cast, shape, x, theta)

    def f_fwd(x: jax.Array, theta: jax.Array) -> tuple:
        return f(x, theta), (x, theta)

    def f_bwd(res: tuple, g: jax.Array) -> tuple:
        x, theta = res
        shapes = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(theta.shape, theta.dtype),
        )

        def host(x: np.ndarray, t: np.ndarray, g: np.ndarray) -> tuple:
            dx, dt = backward(x, t, g)
            return dx.astype(x.dtype), dt.astype(t.dtype)

        return jax.pure_callback(host, shapes, x, theta, g)

    f.defvjp(f_fwd, f_bwd)
    return f
