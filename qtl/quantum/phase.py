"""Circuits of RX gates and CNOTs (the QViT's) in real arithmetic: a phase polynomial.

Why: the QViT's quantum layers are RX encodings, RX rotations and CNOT rings, run over a very
large batch (images x tokens x projections) of few-qubit circuits. Simulated as they are, the
amplitudes are complex and each layer is a complex GEMM per wire group. Conjugated by
Hadamards on every wire, the same circuit is much simpler: H RX(a) H = RZ(a) (diagonal) and
H(x)H CNOT(c, t) H(x)H = CNOT(t, c) (a permutation), acting on H|0...0> = |+...+>. So the
state stays uniform in magnitude with a phase Phi(j) = sum_g a_g p_g(j) (up to a global
phase), where a_g is gate g's angle and p_g(j) in {0, 1} is its wire's bit at the time of the
gate, a GF(2)-linear function (a parity) of the final basis index j. The measured
<Z_w> = <+|... X_w ...|+> in that frame is

    <Z_w> = 2^-n sum_j cos(Phi(j ^ e_w) - Phi(j))
          = 2^(1-n) sum_{j: bit w = 0} cos(Phi(j ^ e_w) - Phi(j))

(the imaginary parts cancel in pairs). Per example that is one (G, 2^n) product with a fixed
0/1 table (G: distinct parities, about n per layer) and n 2^(n-1) cosines, all real, with
gradients by autodiff through one GEMM and the cosines: no complex state, no 2x2 gates.
Exact, not an approximation; the float64 grid in tests/test_fast_sim.py checks it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates

MAX_QUBITS = 20  # the (G, 2^n) parity table: 20 qubits, 40 parities = 160 MiB of float32


def _gf2_inverse(m: np.ndarray) -> np.ndarray:
    """The inverse of an invertible GF(2) matrix (Gauss-Jordan)."""
    n = m.shape[0]
    a = np.concatenate([m.astype(np.uint8) % 2, np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        pivot = col + int(np.argmax(a[col:, col]))
        if not a[pivot, col]:
            raise ValueError("CNOT network matrix is singular (cannot happen for a circuit)")
        a[[col, pivot]] = a[[pivot, col]]
        rows = np.nonzero(a[:, col])[0]
        for r in rows[rows != col]:
            a[r] ^= a[col]
    return a[:, n:]


def phase_table(spec: CircuitSpec) -> tuple[list[list[Symbol]], np.ndarray] | None:
    """The circuit's phase polynomial: for each distinct parity, the angle symbols that add up
    to its coefficient, and the parities as rows over the final index bits (G, n) (column
    w: wire w). None when the circuit has gates other than RX and CNOT."""
    n = spec.n_qubits
    ops = circuit_gates(spec)
    if not ops or any(op.name not in ("RX", "CNOT") for op in ops):
        return None
    rows = np.eye(n, dtype=np.uint8)  # current bit w = rows[w] . (initial bits), in H frame
    terms: list[tuple[np.ndarray, Symbol]] = []
    for op in ops:
        wires = op.wires
        if op.name == "CNOT":  # in the H frame the control and target swap: bit_c ^= bit_t
            control, target = wires
            rows[control] ^= rows[target]
            continue
        sym = op.param
        if not isinstance(sym, Symbol):
            raise ValueError(f"fast simulator: gate RX has a fixed parameter {sym!r}")
        terms.append((rows[wires[0]].copy(), sym))
    # a gate's parity over the initial bits r, in the final bits j = R b: r . R^-1 j
    final = _gf2_inverse(rows)
    groups: dict[bytes, tuple[np.ndarray, list[Symbol]]] = {}
    for r, sym in terms:
        parity = (r.astype(np.int64) @ final.astype(np.int64)) % 2
        if not parity.any():  # a global phase
            continue
        groups.setdefault(parity.astype(np.uint8).tobytes(), (parity, []))[1].append(sym)
    parities = np.stack([p for p, _ in groups.values()]).astype(np.uint8)
    return [syms for _, syms in groups.values()], parities


def _angle_matrix(
    symbols: list[list[Symbol]], n: int, theta_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """0/1 matrices (n, G) and (theta.size, G) that sum the inputs' and weights' angles into
    each parity's coefficient."""
    mx = np.zeros((n, len(symbols)), np.float32)
    mt = np.zeros((int(np.prod(theta_shape)), len(symbols)), np.float32)
    for g, syms in enumerate(symbols):
        for s in syms:
            if s.array == "x":
                mx[s.index[0], g] += 1
            else:
                mt[np.ravel_multi_index(s.index, theta_shape), g] += 1
    return mx, mt


def phase_circuit(spec: CircuitSpec) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """``f(x (B, n), theta) -> (B, n)`` <Z_i> by the phase polynomial, or None where the
    circuit is not RX + CNOT (or is too wide for the parity table)."""
    if spec.n_qubits > MAX_QUBITS:
        return None
    found = phase_table(spec)
    if found is None:
        return None
    symbols, parities = found
    n = spec.n_qubits
    mx, mt = _angle_matrix(symbols, n, spec.theta_shape)
    # p[g, j] = parity of (parities[g] & j), j's wire 0 the most significant bit
    bits = (np.arange(2**n)[:, None] >> np.arange(n - 1, -1, -1)[None, :]) & 1  # (2^n, n)
    table = ((parities.astype(np.int64) @ bits.T) % 2).astype(np.float32)  # (G, 2^n)

    def run(x: jax.Array, theta: jax.Array) -> jax.Array:
        dtype = x.dtype
        coeff = x @ jnp.asarray(mx, dtype) + (theta.reshape(-1) @ jnp.asarray(mt, dtype))[None]
        phi = jnp.matmul(coeff, jnp.asarray(table, dtype), precision=jax.lax.Precision.HIGHEST)
        batch = x.shape[0]
        z = []
        for w in range(n):
            # static slices (their gradient is a pad), not takes (a gather's is a scatter-add,
            # which XLA:CPU runs element by element)
            pairs = phi.reshape(batch, 2**w, 2, 2 ** (n - 1 - w))
            diff = pairs[:, :, 1, :] - pairs[:, :, 0, :]
            z.append(jnp.mean(jnp.cos(diff).reshape(batch, -1), axis=-1))
        return jnp.stack(z, axis=-1)

    return run
