"""Noisy circuits as quantum trajectories (Monte-Carlo wave functions), gate by gate in JAX.

Each trajectory is a pure state: after every gate of the gate list
(:func:`qtl.quantum.circuit.circuit_gates`, the circuit's one definition) the channels of
:mod:`qtl.quantum.noise.channels` pick one Kraus branch at random. Pauli channels
(depolarizing, phase damping as a Z flip) pick with fixed probabilities, so no norm changes;
amplitude damping jumps with probability gamma P(wire = 1) (the branch's ||K psi||^2) and the
state is renormalised. The mean of <Z_i> over trajectories is an unbiased estimate of the
density-matrix value, with spread ~1/sqrt(K).

Cost: the gates before the first CNOT act on a product state (n 2-vectors per trajectory,
noise included), so the encoding layer costs O(n); after it, one pass over the 2^n state per
gate (two with amplitude damping), batch x trajectories rows at once, in chunks whose states
fit ``max_state_mb``, each chunk and each block of gates rematerialised in the backward pass.

Gradients: ``jax.grad`` runs through each trajectory with its Kraus branches fixed by the
keys. For Pauli channels the branch probabilities do not depend on the parameters, so the
gradient of the trajectory mean is unbiased. For amplitude damping they do
(gamma P(wire = 1)), and the pathwise gradient leaves out that dependence (the score-function
term): a biased, lower-variance gradient; the forward estimate stays unbiased.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates
from qtl.quantum.noise.channels import NoiseParams, apply_readout, phase_flip_probability

_C = jnp.complex64
_PAULI = np.array(
    [[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[0, -1j], [1j, 0]], [[1, 0], [0, -1]]], np.complex64
)
_H = np.array([[1, 1], [1, -1]], np.complex64) / np.sqrt(2)
_TINY = 1e-30


def _angle(sym: Symbol, x: jax.Array, theta: jax.Array) -> jax.Array:
    if sym.array == "x":
        return x[:, sym.index[0]]
    return jnp.broadcast_to(theta[sym.index], x.shape[:1])


def _gate_matrix(op, x: jax.Array, theta: jax.Array) -> jax.Array:
    """(M, 2, 2) complex64 matrix of a one-qubit gate per row."""
    m = x.shape[0]
    if op.name == "Hadamard":
        return jnp.broadcast_to(jnp.asarray(_H), (m, 2, 2))
    a = _angle(op.param, x, theta).astype(jnp.float32) / 2
    c, s = jnp.cos(a).astype(_C), jnp.sin(a).astype(_C)
    zero = jnp.zeros_like(c)
    if op.name == "RY":
        rows = [[c, -s], [s, c]]
    elif op.name == "RX":
        rows = [[c, -1j * s], [-1j * s, c]]
    elif op.name == "RZ":
        rows = [[c - 1j * s, zero], [zero, c + 1j * s]]
    else:
        raise ValueError(f"noisy simulator: gate {op.name} is not supported")
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


class _State:
    """M trajectories' states: n per-wire 2-vectors (product) or the flat (M, 2^n) vector."""

    def __init__(self, n: int, m: int):
        self.n = n
        zero = jnp.zeros((m, n, 2), _C).at[:, :, 0].set(1.0)
        self.vectors: jax.Array | None = zero
        self.full: jax.Array | None = None

    def apply(self, wire: int, mat: jax.Array) -> None:
        if self.vectors is not None:
            v = jnp.einsum("mij,mj->mi", mat, self.vectors[:, wire])
            self.vectors = self.vectors.at[:, wire].set(v)
            return
        m = self.full.shape[0]
        s = self.full.reshape(m, 2**wire, 2, -1)
        s0, s1 = s[:, :, 0, :], s[:, :, 1, :]
        e = mat[:, :, :, None, None]  # elementwise (one fused loop), not a batched GEMM
        out = jnp.stack([e[:, 0, 0] * s0 + e[:, 0, 1] * s1, e[:, 1, 0] * s0 + e[:, 1, 1] * s1], 2)
        self.full = out.reshape(m, -1)

    def prob_one(self, wire: int) -> jax.Array:
        """P(wire reads 1) per row (states are kept normalised)."""
        if self.vectors is not None:
            return jnp.abs(self.vectors[:, wire, 1]) ** 2
        m = self.full.shape[0]
        s = self.full.reshape(m, 2**wire, 2, -1)[:, :, 1, :]
        return jnp.sum(jnp.abs(s) ** 2, axis=(1, 2))

    def expand(self) -> None:
        if self.vectors is None:
            return
        v = self.vectors
        state = v[:, 0]
        for w in range(1, self.n):
            state = (state[:, :, None] * v[:, w, None, :]).reshape(v.shape[0], -1)
        self.full, self.vectors = state, None

    def cnot(self, control: int, target: int) -> None:
        self.expand()
        m = self.full.shape[0]
        lo, hi = sorted((control, target))
        shape = (m, 2**lo, 2, 2 ** (hi - lo - 1), 2, 2 ** (self.n - hi - 1))
        s = self.full.reshape(shape)
        c_axis, t_axis = (2, 4) if control < target else (4, 2)
        on = (jnp.arange(2) == 1).reshape([2 if a == c_axis else 1 for a in range(6)])
        # the target bit flipped where the control bit is 1: a select, fused into one pass
        self.full = jnp.where(on, jnp.flip(s, axis=t_axis), s).reshape(m, -1)

    def z(self) -> jax.Array:
        """<Z_i> per row: (M, n)."""
        if self.vectors is not None:
            p = jnp.abs(self.vectors) ** 2
            return (p[..., 0] - p[..., 1]) / (p[..., 0] + p[..., 1])
        m = self.full.shape[0]
        probs = jnp.abs(self.full) ** 2
        out = []
        for w in range(self.n):
            pw = probs.reshape(m, 2**w, 2, -1).sum(axis=(1, 3))
            out.append(pw[:, 0] - pw[:, 1])
        return jnp.stack(out, -1)


class _Noise:
    """Draws the Kraus branches of one chunk of trajectories, one key per noise event; or
    reads them from ``table`` (M, events) from column ``offset`` on (the same events for
    another simulator of them: :func:`count_events`)."""

    def __init__(
        self,
        params: NoiseParams,
        key: jax.Array | None,
        m: int,
        table: jax.Array | None = None,
        offset: int = 0,
    ):
        self.params, self.key, self.m, self.event = params, key, m, 0
        self.table, self.offset = table, offset
        self.pauli = jnp.asarray(_PAULI)

    def _uniform(self) -> jax.Array:
        self.event += 1
        if self.table is not None:
            return self.table[:, self.offset + self.event - 1]
        return jax.random.uniform(jax.random.fold_in(self.key, self.event), (self.m,))

    def depolarize(self, p: float) -> jax.Array:
        """(M, 2, 2): X, Y or Z each with p/3, else I."""
        u = self._uniform()
        idx = jnp.where(u < p, 1 + jnp.minimum((u / p * 3).astype(jnp.int32), 2), 0)
        return self.pauli[idx]

    def depolarize_2q(self, p: float) -> tuple[jax.Array, jax.Array]:
        """A two-qubit Pauli (not II) with p/15 each, as (control, target) matrices."""
        u = self._uniform()
        idx = jnp.where(u < p, 1 + jnp.minimum((u / p * 15).astype(jnp.int32), 14), 0)
        return self.pauli[idx // 4], self.pauli[idx % 4]

    def phase_flip(self, q: float) -> jax.Array:
        u = self._uniform()
        return self.pauli[jnp.where(u < q, 3, 0)]

    def damp(self, state: _State, wire: int, gamma: float) -> jax.Array:
        """(M, 2, 2) normalised amplitude-damping branch: jump with gamma P(1)."""
        u = self._uniform()
        jump_p = gamma * state.prob_one(wire)
        jump = u < jump_p
        k1 = jnp.asarray(np.array([[0, np.sqrt(gamma)], [0, 0]], np.complex64))
        k0 = jnp.asarray(np.array([[1, 0], [0, np.sqrt(1 - gamma)]], np.complex64))
        # each branch's norm only where it is taken: the other side of a where still gets a
        # (zero) cotangent, and 0 * rsqrt'(tiny) = 0 * inf would be NaN
        s1 = jax.lax.rsqrt(jnp.maximum(jnp.where(jump, jump_p, 1.0), _TINY)).astype(_C)
        s0 = jax.lax.rsqrt(jnp.maximum(jnp.where(jump, 1.0, 1.0 - jump_p), _TINY)).astype(_C)
        return jnp.where(jump[:, None, None], k1 * s1[:, None, None], k0 * s0[:, None, None])


def _wire_channels(
    state: _State, noise: _Noise, wire: int, pending: jax.Array, dep: float, ad: float, pd: float
) -> None:
    """Apply ``pending`` (the gate, maybe a Pauli) then depolarizing, damping, dephasing."""
    if dep > 0:
        pending = noise.depolarize(dep) @ pending
    if ad > 0:
        state.apply(wire, pending)
        pending = noise.damp(state, wire, ad)
    q = float(phase_flip_probability(pd))
    if q > 0:
        pending = noise.phase_flip(q) @ pending
    state.apply(wire, pending)


def _run_ops(ops, state: _State, noise: _Noise, params: NoiseParams, x, theta) -> None:
    eye = jnp.broadcast_to(jnp.eye(2, dtype=_C), (x.shape[0], 2, 2))
    cnot_ad, cnot_pd = params.cnot_damping()
    for op in ops:
        reps = params.pulses.get(op.name, 1)
        wires = op.wires
        if op.name == "CNOT":
            c, t = wires
            state.cnot(c, t)
            for _ in range(reps):
                p2 = params.pair(c, t)
                mc, mt = noise.depolarize_2q(p2) if p2 > 0 else (eye, eye)
                for w, mat in ((c, mc), (t, mt)):
                    _wire_channels(state, noise, w, mat, 0.0, float(cnot_ad[w]), float(cnot_pd[w]))
            continue
        (w,) = wires
        mat = _gate_matrix(op, x, theta)
        dep, ad, pd = (
            float(params.depolarizing[w]),
            float(params.amplitude_damping[w]),
            float(params.phase_damping[w]),
        )
        if reps == 0:
            state.apply(w, mat)
        for r in range(reps):
            _wire_channels(state, noise, w, mat if r == 0 else eye, dep, ad, pd)


def count_events(ops: list, params: NoiseParams) -> int:
    """How many uniforms ``_run_ops`` draws for ``ops``: one per channel that acts, per gate
    (and pulse), in tape order. The column order of ``with_uniforms``' table."""
    cnot_ad, cnot_pd = params.cnot_damping()
    count = 0
    for op in ops:
        reps = params.pulses.get(op.name, 1)
        wires = op.wires
        if op.name == "CNOT":
            c, t = wires
            per = int(params.pair(c, t) > 0)
            for w in (c, t):
                per += int(cnot_ad[w] > 0) + int(phase_flip_probability(cnot_pd[w]) > 0)
        else:
            (w,) = wires
            per = int(params.depolarizing[w] > 0) + int(params.amplitude_damping[w] > 0)
            per += int(phase_flip_probability(params.phase_damping[w]) > 0)
        count += reps * per
    return count


def _blocks(ops: list, size: int) -> list[list]:
    """The tape cut into the product-state prefix and blocks of ~``size`` gates."""
    first = next((i for i, op in enumerate(ops) if op.name == "CNOT"), len(ops))
    rest = ops[first:]
    return [ops[:first]] + [rest[i : i + size] for i in range(0, len(rest), size)]


def trajectory_circuit(
    spec: CircuitSpec, params: NoiseParams, trajectories: int, max_state_mb: float = 16.0
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``f(x (B, n), theta, key) -> (B, n)``: the mean <Z_i> over ``trajectories`` per row,
    read through the readout error. Same keys, same trajectories."""
    ops = list(circuit_gates(spec))
    n = spec.n_qubits
    blocks = _blocks(ops, max(4, n))
    k = int(trajectories)

    offsets = np.cumsum([0] + [count_events(block, params) for block in blocks]).tolist()

    def chunk_fn(
        x: jax.Array, theta: jax.Array, key: jax.Array | None, table: jax.Array | None = None
    ) -> jax.Array:
        m = x.shape[0]
        noise = _Noise(params, key, m, table)
        state = _State(n, m)
        _run_ops(blocks[0], state, noise, params, x, theta)
        state.expand()
        amps = state.full
        for b, block in enumerate(blocks[1:]):

            def run_block(amps, x, theta, key, table, block=block, b=b):
                s = _State(n, m)
                s.vectors, s.full = None, amps
                sub = None if key is None else jax.random.fold_in(key, 1 + b)
                nz = _Noise(params, sub, m, table, offsets[1 + b])
                _run_ops(block, s, nz, params, x, theta)
                return s.full

            amps = jax.checkpoint(run_block)(amps, x, theta, key, table)
        s = _State(n, m)
        s.vectors, s.full = None, amps
        return s.z()

    state_bytes = 2**n * 8

    def run(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        squeeze = x.ndim == 1
        x2 = (x[None] if squeeze else x).astype(jnp.float32)
        batch = x2.shape[0]
        rows = jnp.repeat(x2, k, axis=0)  # (B K, n): example b's trajectories are rows bK..bK+K-1
        total = rows.shape[0]
        chunk = max(1, min(total, int(max_state_mb * 2**20 // state_bytes)))
        chunks = -(-total // chunk)
        padded = jnp.pad(rows, ((0, chunks * chunk - total), (0, 0)))
        keys = jax.random.split(key, chunks)
        theta32 = theta.astype(jnp.float32)
        if chunks == 1:
            z = chunk_fn(padded, theta32, keys[0])
        else:
            step = jax.checkpoint(lambda args: chunk_fn(args[0], theta32, args[1]))
            z = jax.lax.map(step, (padded.reshape(chunks, chunk, n), keys)).reshape(-1, n)
        z = z[:total].reshape(batch, k, n).mean(axis=1)
        z = apply_readout(z, params) if params.readout else z
        z = z.astype(x.dtype)
        return z[0] if squeeze else z

    def with_uniforms(x: jax.Array, theta: jax.Array, table: jax.Array) -> jax.Array:
        """(B K, n) single-trajectory <Z> (readout included), row b K + j example b's j-th,
        its events read from ``table`` (B K, ``count_events``) instead of drawn: one chunk."""
        rows = jnp.repeat(x.astype(jnp.float32), k, axis=0)
        z = chunk_fn(rows, theta.astype(jnp.float32), None, table.astype(jnp.float32))
        return apply_readout(z, params) if params.readout else z

    run.with_uniforms = with_uniforms  # type: ignore[attr-defined]
    run.events = offsets[-1]  # type: ignore[attr-defined]
    return run
