"""Pauli-channel trajectories on the exact simulator's whole-circuit kernel (Pauli frames).

Why: under depolarizing noise (one- and two-qubit) and phase damping (a Z flip with
probability (1 - sqrt(1 - gamma))/2), every trajectory is the noise-free circuit with Pauli
gates inserted, drawn with probabilities that do not depend on the state or the parameters.
A Pauli inserted after a CNOT is pushed back through the CNOTs before it in its network (a
Clifford conjugation: X^a Z^b -> X^(M^-1 a) Z^(M^T b) for the network's GF(2) basis map M,
up to a global phase) to the rotation layer before that network, and every Pauli is then
folded into that wire's 2x2 (Y is i XZ, and a global phase does not change <Z>, so the
study's H/RY circuit stays real). So a trajectory is the exact circuit with its own prefix
vectors and layer matrices, and all B x K rows run through the exact simulator's whole-circuit
kernel in one call, its adjoint gradient included (:func:`qtl.quantum.fast.row_state_kernel`:
``statevector.cc`` for real circuits, ``complex_circuit.cc`` for RX/RZ ones such as the
QViT's); the bookkeeping is a few (B K, n) operations per gate in JAX. Same law as
:mod:`qtl.quantum.noise.trajectories` (the same events from the same uniforms give the same
trajectories: ``with_uniforms``, tested), and the gradient of the trajectory mean is unbiased
(branch probabilities are constants).

Where it applies: Pauli channels only (amplitude damping, and so a device model's thermal
relaxation, changes branch probabilities with the state: it stays on the gate-by-gate path),
circuits a whole-circuit kernel runs (a prefix, then CNOT networks and rotation layers; real
ones with >= 4 wires, complex ones with 2-20) on a CPU with the native kernels, and one-layer
circuits anywhere (the QViT's default: a product state read through the last network as
parities, no state vector). Elsewhere (a GPU, ``QTL_NATIVE=0``) the gate-by-gate path runs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates
from qtl.quantum.fast import cnot_network_matrix, column_angles, compile_plan, row_state_kernel
from qtl.quantum.noise.channels import NoiseParams, apply_readout, phase_flip_probability
from qtl.quantum.noise.trajectories import count_events

_H = np.array([[1, 1], [1, -1]], np.float32) / np.sqrt(np.float32(2))


def pauli_only(params: NoiseParams) -> bool:
    """Whether every gate channel is a Pauli channel (no amplitude damping anywhere)."""
    cnot_ad, _ = params.cnot_damping()
    return not (params.amplitude_damping.any() or np.asarray(cnot_ad).any())


def _layout(ops: list, params: NoiseParams) -> list[tuple[str, object]]:
    """The tape as segments with their noise events, each event with its column of the
    uniforms table (the order of :func:`count_events`, so both simulators read the same).

    ("local", {wire: [("gate", name, symbol) | ("dep", col, p) | ("flip", col, q)]}) and
    ("cnot", [(control, target, [("dep2", col, p) | ("flip", col, q, wire)])]).
    """
    _, cnot_pd = params.cnot_damping()
    segments: list[tuple[str, object]] = []
    col = 0
    for op in ops:
        reps = params.pulses.get(op.name, 1)
        kind = "cnot" if op.name == "CNOT" else "local"
        if not segments or segments[-1][0] != kind:
            segments.append((kind, [] if kind == "cnot" else {}))
        body = segments[-1][1]
        if kind == "cnot":
            c, t = op.wires
            events = []
            for _ in range(reps):
                if params.pair(c, t) > 0:
                    events.append(("dep2", col, float(params.pair(c, t))))
                    col += 1
                for w in (c, t):
                    q = float(phase_flip_probability(cnot_pd[w]))
                    if q > 0:
                        events.append(("flip", col, q, w))
                        col += 1
            body.append((c, t, events))
            continue
        (w,) = op.wires
        items = body.setdefault(w, [])
        items.append(("gate", op.name, op.param))
        dep = float(params.depolarizing[w])
        q = float(phase_flip_probability(params.phase_damping[w]))
        for _ in range(reps):
            if dep > 0:
                items.append(("dep", col, dep))
                col += 1
            if q > 0:
                items.append(("flip", col, q))
                col += 1
    return segments


def _pauli_bits(idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pauli index (0 I, 1 X, 2 Y, 3 Z) -> its (x, z) bits: P = X^x Z^z up to a phase."""
    return (idx == 1) | (idx == 2), idx >= 2


def _depolarize(u: jax.Array, p: float | jax.Array) -> jax.Array:
    # the gate-by-gate path's draw (trajectories._Noise.depolarize), expression for expression
    return jnp.where(u < p, 1 + jnp.minimum((u / p * 3).astype(jnp.int32), 2), 0)


def _depolarize_2q(u: jax.Array, p: float | jax.Array) -> jax.Array:
    return jnp.where(u < p, 1 + jnp.minimum((u / p * 15).astype(jnp.int32), 14), 0)


def _apply_pauli(x: jax.Array, z: jax.Array, a: jax.Array, vector: bool) -> jax.Array:
    """X^x Z^z a, per row and wire: a (..., 2, 2) matrices or (..., 2) vectors."""
    if vector:
        r0, r1 = a[..., 0], a[..., 1]
        r1 = jnp.where(z, -r1, r1)
        return jnp.stack([jnp.where(x, r1, r0), jnp.where(x, r0, r1)], -1)
    r0, r1 = a[..., 0, :], a[..., 1, :]
    r1 = jnp.where(z[..., None], -r1, r1)
    return jnp.stack([jnp.where(x[..., None], r1, r0), jnp.where(x[..., None], r0, r1)], -2)


def _gate(name: str, angle: jax.Array | None, shape: tuple[int, ...], dtype) -> jax.Array:
    """(*shape, 2, 2) matrices of one gate kind (float32 for H/RY, complex64 for RX/RZ)."""
    if name == "Hadamard":
        return jnp.broadcast_to(jnp.asarray(_H, dtype), (*shape, 2, 2))
    c, s = jnp.cos(angle / 2).astype(dtype), jnp.sin(angle / 2).astype(dtype)
    if name == "RY":
        rows = [[c, -s], [s, c]]
    elif name == "RX":
        rows = [[c, -1j * s], [-1j * s, c]]
    elif name == "RZ":
        zero = jnp.zeros_like(c)
        rows = [[c - 1j * s, zero], [zero, c + 1j * s]]
    else:
        raise ValueError(f"Pauli-frame trajectories: gate {name} is not supported")
    mat = jnp.stack([jnp.stack(r, -1) for r in rows], -2)
    return jnp.broadcast_to(mat, (*shape, 2, 2))


def _local(
    gates: dict[int, list],
    n: int,
    x: jax.Array,
    theta: jax.Array,
    u: jax.Array,
    frame: tuple[jax.Array, jax.Array],
    vector: bool,
    dtype,
) -> jax.Array:
    """Every wire's gates and Paulis in order, then the frame pushed back from the next
    network: (M, n, 2) states of |0> (``vector``, the prefix) or (M, n, 2, 2) matrices.
    Wires with the same sequence are built together (a small traced program)."""
    rows = x.shape[0]
    flat_theta = theta.reshape(-1)
    by_signature: dict[tuple, list[int]] = {}
    for w in range(n):
        sig = tuple(item[0] if item[0] != "gate" else item[1] for item in gates.get(w, []))
        sig += tuple(item[2] for item in gates.get(w, []) if item[0] != "gate")
        by_signature.setdefault(sig, []).append(w)
    parts, order = [], []
    for wires in by_signature.values():
        k = len(wires)
        if vector:
            a = jnp.broadcast_to(jnp.array([1.0, 0.0], dtype), (rows, k, 2))
        else:
            a = jnp.broadcast_to(jnp.eye(2, dtype=dtype), (rows, k, 2, 2))
        for j, item in enumerate(gates.get(wires[0], [])):
            column = [gates[w][j] for w in wires]
            if item[0] == "gate":
                syms: list[Symbol | None] = [c[2] for c in column]
                angle = column_angles(item[1], syms, x, flat_theta, theta.shape)
                if angle is not None and syms[0].array != "x":
                    angle = jnp.broadcast_to(angle, (rows, k))
                g = _gate(item[1], angle, (rows, k), dtype)
                if vector:
                    a = jnp.einsum("mkij,mkj->mki", g, a)
                else:
                    a = jnp.einsum("mkij,mkjl->mkil", g, a)
                continue
            draws = u[:, np.array([c[1] for c in column])]  # (M, k)
            if item[0] == "dep":
                px, pz = _pauli_bits(_depolarize(draws, item[2]))
            else:  # flip
                px, pz = jnp.zeros(draws.shape, bool), draws < item[2]
            a = _apply_pauli(px, pz, a, vector)
        fx, fz = frame
        parts.append(_apply_pauli(fx[:, wires], fz[:, wires], a, vector))
        order.extend(wires)
    out = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if order != list(range(n)):
        out = jnp.take(out, np.argsort(order), axis=1)
    return out


def _frame(cnots: list, n: int, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (x, z) bits (M, n) of every Pauli drawn after this network's CNOTs, pushed back
    to before the network: after CNOTs V = pairs[:k+1], X^a Z^b moves to X^(M^-1 a) Z^(M^T b).
    All the network's draws at once (a few ops, whatever its size: a small program)."""
    rows = u.shape[0]
    pairs = [(c, t) for c, t, _ in cnots]
    dep_cols, dep_p, dep_x, dep_z = [], [], [], []  # per two-qubit event: (2, n) images
    flip_cols, flip_q, flip_z = [], [], []
    for k, (c, t, events) in enumerate(cnots):
        inv = cnot_network_matrix(n, pairs[: k + 1][::-1])  # M^-1: columns are X images
        fwd_t = cnot_network_matrix(n, pairs[: k + 1]).T  # M^T: columns are Z images
        for event in events:
            if event[0] == "dep2":
                dep_cols.append(event[1])
                dep_p.append(event[2])
                dep_x.append(np.stack([inv[:, c], inv[:, t]]))
                dep_z.append(np.stack([fwd_t[:, c], fwd_t[:, t]]))
            else:  # flip on wire event[3]
                flip_cols.append(event[1])
                flip_q.append(event[2])
                flip_z.append(fwd_t[:, event[3]])
    x_bits, x_images, z_bits, z_images = [], [], [], []
    if dep_cols:
        p = jnp.asarray(np.array(dep_p, np.float32))
        idx = _depolarize_2q(u[:, np.array(dep_cols)], p)  # (M, E), as one event at a time
        for side, pauli in enumerate((idx // 4, idx % 4)):  # control, target
            px, pz = _pauli_bits(pauli)
            x_bits.append(px)
            z_bits.append(pz)
            x_images.append(np.stack(dep_x)[:, side])
            z_images.append(np.stack(dep_z)[:, side])
    if flip_cols:
        q = jnp.asarray(np.array(flip_q, np.float32))
        z_bits.append(u[:, np.array(flip_cols)] < q)
        z_images.append(np.stack(flip_z))

    def push(bits: list, images: list) -> jax.Array:
        if not bits:
            return jnp.zeros((rows, n), bool)
        b = jnp.concatenate(bits, 1).astype(jnp.int32)
        return (b @ jnp.asarray(np.concatenate(images).astype(np.int32))) % 2 == 1

    return push(x_bits, x_images), push(z_bits, z_images)


def _pairs(z: jax.Array) -> jax.Array:
    return jnp.stack([jnp.real(z), jnp.imag(z)], -1).astype(jnp.float32)


def _event_probabilities(segments: list, events: int) -> np.ndarray:
    """(events,) the probability that each event draws a non-identity Pauli."""
    probs = np.zeros(events)
    for kind, body in segments:
        items = (
            [e for _, _, evs in body for e in evs]
            if kind == "cnot"
            else [i for items in body.values() for i in items if i[0] != "gate"]
        )
        for item in items:
            probs[item[1]] = item[2]
    return probs


def noisy_row_capacity(rows: int, hit: float, spread: float = 6.0) -> int:
    """Rows to simulate for the trajectories that drew a Pauli: the mean count plus ``spread``
    standard deviations (a binomial count; beyond it, every row is simulated)."""
    mean = rows * hit
    return min(rows, int(np.ceil(mean + spread * np.sqrt(mean * (1 - hit)) + 4)))


def pauli_frame_circuit(
    spec: CircuitSpec, params: NoiseParams, trajectories: int, capacity: int | None = None
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None:
    """``f(x (B, n), theta, key) -> (B, n)``: the mean <Z_i> over ``trajectories`` per row,
    read through the readout error, as :func:`trajectory_circuit` computes it; None where
    this path does not apply (see the module's docstring).

    A trajectory that draws no Pauli at all is the noise-free circuit: each example's runs
    once, and only the trajectories that drew one are simulated, up to ``capacity`` rows
    (default :func:`noisy_row_capacity`; more than that: every row, through ``lax.cond``).
    At p = 1e-3 and n = 19 (152 events) ~14% of the trajectories draw one."""
    if not pauli_only(params):
        return None
    n, k = spec.n_qubits, int(trajectories)
    ops = list(circuit_gates(spec))
    events = count_events(ops, params)
    segments = _layout(ops, params)
    # the kernel's plan: a prefix, then (network, layer) pairs, then the measured network
    kinds = [kind for kind, _ in segments]
    if kinds != ["local"] + ["cnot", "local"] * ((len(kinds) - 2) // 2) + ["cnot"]:
        return None
    real = compile_plan(spec).real
    kernel = None
    if len(kinds) == 2:  # one layer: a product state, measured through the last network
        masks = jnp.asarray(cnot_network_matrix(n, [(c, t) for c, t, _ in segments[1][1]]))
    else:
        found = row_state_kernel(spec)
        if found is None:
            return None
        kernel = found[1]
    dtype = jnp.float32 if real else jnp.complex64

    def rows_z(rows: jax.Array, theta: jax.Array, u: jax.Array) -> jax.Array:
        """(R, n) <Z> of each row's trajectory, its events from the uniforms u (R, events)."""
        frames = [_frame(body, n, u) for kind, body in segments if kind == "cnot"]
        locals_ = [body for kind, body in segments if kind == "local"]
        vectors = _local(locals_[0], n, rows, theta, u, frames[0], True, dtype)
        if kernel is None:  # <Z_i> = prod over wires w of row i of the network's map: <Z_w>
            p = jnp.real(vectors) ** 2 + jnp.imag(vectors) ** 2  # |.|^2, smooth at 0
            zw = (p[..., 0] - p[..., 1]).astype(jnp.float32)
            z = jnp.prod(jnp.where(masks[None] == 1, zw[:, None, :], 1.0), axis=-1)
            return apply_readout(z, params) if params.readout else z
        mats = jnp.stack(
            [
                _local(body, n, rows, theta, u, frames[i + 1], False, dtype)
                for i, body in enumerate(locals_[1:])
            ],
            axis=1,
        )  # (R, m, n, 2, 2)
        if not real:  # the complex kernel takes (re, im) pairs
            vectors, mats = _pairs(vectors), _pairs(mats)
        z = kernel(vectors, mats)
        return apply_readout(z, params) if params.readout else z

    probs = _event_probabilities(segments, events)
    hit = 1.0 - float(np.prod(1.0 - probs))  # P(a trajectory draws a non-identity Pauli)
    thresholds = jnp.asarray(probs, jnp.float32)

    def mean_z(x2: jax.Array, theta: jax.Array, u: jax.Array) -> jax.Array:
        batch = x2.shape[0]
        rows = jnp.repeat(x2, k, axis=0)  # (B K, n): example b's trajectories are bK..bK+K-1
        total = rows.shape[0]

        def every_row(_=None):
            return rows_z(rows, theta, u).reshape(batch, k, n).mean(axis=1)

        cap = noisy_row_capacity(total, hit) if capacity is None else capacity
        if batch + cap >= 0.9 * total:  # most trajectories draw a Pauli: simulate them all
            return every_row()
        clean = jnp.all(u >= thresholds, axis=1)  # the draws of _depolarize, _frame: identity
        hits = total - clean.sum()

        def noisy_rows(_=None):
            # one kernel call: the B noise-free rows (uniforms of 1 draw no Pauli), then the
            # rows that drew one (padded to the capacity with row 0, masked out)
            index = jnp.nonzero(~clean, size=cap, fill_value=0)[0]
            ones = jnp.ones((batch, events), u.dtype)
            both = rows_z(
                jnp.concatenate([x2, rows[index]]), theta, jnp.concatenate([ones, u[index]])
            )
            exact, z = both[:batch], both[batch:]
            z = jnp.where((jnp.arange(cap) < hits)[:, None], z, 0.0)
            sums = jnp.zeros((batch, n), z.dtype).at[index // k].add(z)
            return (clean.reshape(batch, k).sum(1)[:, None] * exact + sums) / k

        return jax.lax.cond(hits <= cap, noisy_rows, every_row)

    def run(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        squeeze = x.ndim == 1
        x2 = (x[None] if squeeze else x).astype(jnp.float32)
        u = jax.random.uniform(key, (x2.shape[0] * k, events))
        z = mean_z(x2, theta.astype(jnp.float32), u).astype(x.dtype)
        return z[0] if squeeze else z

    def with_uniforms(x: jax.Array, theta: jax.Array, table: jax.Array) -> jax.Array:
        """(B K, n) single-trajectory <Z> (readout included), row b K + j example b's j-th,
        its events read from ``table`` (B K, events): what ``trajectory_circuit``'s
        ``with_uniforms`` computes gate by gate."""
        rows = jnp.repeat(x.astype(jnp.float32), k, axis=0)
        return rows_z(rows, theta.astype(jnp.float32), table.astype(jnp.float32))

    run.with_uniforms = with_uniforms  # type: ignore[attr-defined]
    run.events = events  # type: ignore[attr-defined]
    run.from_uniforms = mean_z  # type: ignore[attr-defined]  # (x, theta, table) -> the mean
    return run
