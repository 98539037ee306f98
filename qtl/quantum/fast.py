"""A state-vector simulator compiled from the circuit's own gate list (``head.simulator=fast``).

Why it is fast, and still exact:
- the circuit is read from :func:`qtl.quantum.circuit.circuit_gates`, the list PennyLane runs
  too, so there is one definition; it is split into single-qubit segments and CNOT networks;
- amplitudes are real float32 when every gate is real (H, RY, CNOT), complex64 otherwise;
- the segment before the first CNOT acts on |0...0> as a product state, built in one pass;
- a CNOT network is a permutation of basis states: one gather, whose gradient is the gather
  by the inverse permutation (no scatter). Its index map is computed once per call from an
  iota, outside the chunk loop (re-deriving it inside every chunk cost ~15% at n=19);
- a later rotation layer is a Kronecker product of 2x2 matrices, applied as one dense GEMM per
  group of ~5 wires. Each GEMM contracts the group at one end of the state and writes the new
  axis at the other end, so no transpose is ever materialised; the batch axis moves from
  first to last and back on alternate layers. The GEMM's VJP is written by hand so the
  weight cotangent is a plain (2^k, K) @ (K, 2^k) product: autodiff's choice transposed both
  operands and ran ~2x slower on the CPU. On the CPU, real float32 circuits skip that product
  altogether: a small C++ kernel (:mod:`qtl.quantum.kernels`) sums only the per-wire 2x2
  Grams the gradient needs, in one read of each state on every core (~15% of the n=19 step);
- <Z_i> after the last CNOT network is the parity of a set of bits measured before it, so
  that network is never applied; the parity sums factor into two small GEMMs (high and low
  halves of the basis index), with no 2^n x n sign table;
- when nothing but single-qubit gates comes before that last network (one variational layer,
  as in the QViT's quantum layers), the state is a product state and a parity's expectation is
  the product of per-wire <Z>: O(n^2) work per example, no 2^n state at all;
- a circuit of RX gates and CNOTs only (the QViT's, at two or more layers) is a real phase
  polynomial in the Hadamard frame (:mod:`qtl.quantum.phase`, ``phase=True``): one GEMM and
  n 2^(n-1) cosines per example, no complex state (exact; slower through XLA's cosines, so
  opt-in);
- the batch goes through the circuit in chunks whose states fit a bound (cache-sized on a
  CPU, which is faster; memory-sized on a GPU), each rematerialised in the backward pass.

On a CPU, real float32 circuits (the study's) leave the per-layer program at the 2^n state:
``statevector.cc`` (:mod:`qtl.quantum.kernels`) takes each example's state through every
layer while it stays in cache and runs the adjoint method back, from the wire vectors and
layer matrices built here (about 3.5x the per-layer program's speed at n=19, batch 32;
docs/simulator.md). Complex float32 circuits with a state (the QViT's at two or more layers)
leave it the same way, to ``complex_circuit.cc``: groups of 8 examples in the SIMD lanes and
the adjoint method by undoing each unitary gate. The per-layer program stays the path
everywhere else.

Wire 0 is the most significant bit of the basis index, as in PennyLane. Equality with
PennyLane (outputs and gradients, every variant) is tested in ``tests/test_fast_sim.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qtl.quantum import kernels
from qtl.quantum.circuit import CircuitSpec, circuit_gates

MAX_QUBITS = 30  # int32 basis indices; 2^30 float32 amplitudes = 4 GiB per example
_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: the simulator must stay float32-exact
_SUPPORTED = ("Hadamard", "RY", "RX", "RZ", "CNOT")


def cnot_network_matrix(n_qubits: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """The GF(2) matrix M with out_bits = M @ in_bits for CNOTs applied in order."""
    m = np.eye(n_qubits, dtype=np.uint8)
    for control, target in pairs:
        m[target] ^= m[control]
    return m


def _bits_to_index(bits: np.ndarray) -> np.ndarray:
    n = bits.shape[-1]
    weights = 1 << np.arange(n - 1, -1, -1, dtype=np.int64)  # wire 0 = most significant
    return (bits.astype(np.int64) * weights).sum(-1)


def _network_columns(matrix: np.ndarray) -> np.ndarray:
    """A GF(2) index map as the images of the single-wire indices (wire w: column w)."""
    return _bits_to_index(matrix.T.astype(np.int64)).astype(np.int32)


def gf2_index(n_qubits: int, matrix: np.ndarray, index: jax.Array | None = None) -> jax.Array:
    """Basis indices mapped by a GF(2) matrix (bit vector b -> matrix @ b), computed on the
    device from an iota: no 2^n-entry constant is baked into the compiled program."""
    index = jax.lax.iota(jnp.int32, 2**n_qubits) if index is None else index
    columns = _network_columns(matrix)
    out = jnp.zeros_like(index)
    for w in range(n_qubits):
        bit = (index >> (n_qubits - 1 - w)) & 1
        out = out ^ (bit * int(columns[w]))
    return out


def network_indices(n_qubits: int, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """GF(2) matrices of (gather, inverse gather): new[j] = old[gather(j)] applies the network.

    new[M b] = old[b], so gather = M^-1 (the same CNOTs in reverse order) and its inverse is M.
    """
    return cnot_network_matrix(n_qubits, pairs[::-1]), cnot_network_matrix(n_qubits, pairs)


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """The gate list, cut into what the simulator does with each part."""

    n_qubits: int
    prefix: dict[int, list] = field(default_factory=dict)  # wire -> gates before any CNOT
    steps: list[tuple[str, object]] = field(
        default_factory=list
    )  # ("cnot", pairs) | ("local", {wire: gates})
    folded: list[tuple[int, int]] = field(
        default_factory=list
    )  # last CNOT network, measured as parities
    real: bool = True


def compile_plan(spec: CircuitSpec) -> _Plan:
    """Cut the gate list into prefix, alternating CNOT/local steps and a folded network."""
    plan = _Plan(spec.n_qubits)
    segments: list[tuple[str, list]] = []
    for op in circuit_gates(spec):
        if op.name not in _SUPPORTED:
            raise ValueError(
                f"fast simulator: gate {op.name} is not supported ({', '.join(_SUPPORTED)})"
            )
        kind = "cnot" if op.name == "CNOT" else "local"
        if not segments or segments[-1][0] != kind:
            segments.append((kind, []))
        segments[-1][1].append(op)
        if op.name in ("RX", "RZ"):
            plan.real = False
    if segments and segments[0][0] == "local":
        plan.prefix = _by_wire(segments.pop(0)[1])
    if segments and segments[-1][0] == "cnot":
        plan.folded = [tuple(op.wires) for op in segments.pop()[1]]
    for kind, ops in segments:
        if kind == "cnot":
            plan.steps.append(("cnot", [tuple(op.wires) for op in ops]))
            continue
        gates = _by_wire(ops)
        if any(p is not None and p.array == "x" for g in gates.values() for _, p in g):
            raise ValueError("fast simulator: inputs x may only enter before the first CNOT")
        plan.steps.append(("local", gates))
    return plan


def _by_wire(ops) -> dict[int, list]:
    gates: dict[int, list] = {}
    for op in ops:
        gates.setdefault(op.wires[0], []).append((op.name, op.param))
    return gates


# ----------------------------------------------------------------------------- gates


def _gate(name: str, angle: jax.Array | None, dtype) -> jax.Array:
    """(..., 2, 2) matrices of one gate kind; ``angle`` may carry leading axes."""
    if name == "Hadamard":
        return jnp.asarray(np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0), dtype)
    c, s = jnp.cos(angle / 2).astype(dtype), jnp.sin(angle / 2).astype(dtype)
    if name == "RY":
        rows = [[c, -s], [s, c]]
    elif name == "RX":
        rows = [[c, -1j * s], [-1j * s, c]]
    else:  # RZ
        zero = jnp.zeros_like(c)
        rows = [[c - 1j * s, zero], [zero, c + 1j * s]]
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


def column_angles(
    name: str, syms: list, x: jax.Array, flat_theta: jax.Array, theta_shape: tuple[int, ...]
) -> jax.Array | None:
    """The angles of one gate on several wires: (B, wires) from the inputs, (wires,) from the
    weights, None for a fixed gate. One gate reads either inputs or weights on all its wires."""
    if syms[0] is None:
        return None
    if {s.array for s in syms} != {syms[0].array}:
        raise ValueError(f"gate {name} mixes input and weight angles")
    if syms[0].array == "x":
        return x[:, np.array([s.index[0] for s in syms])]
    flat = [int(np.ravel_multi_index(s.index, theta_shape)) for s in syms]
    return flat_theta[np.array(flat)]


def _layer_matrices(
    gates: dict[int, list], n: int, x: jax.Array, theta: jax.Array, dtype
) -> jax.Array:
    """Every wire's gate product (later gates on the left): (n, 2, 2), or (B, n, 2, 2) when a
    gate takes an input angle. Wires with the same gate sequence are built in one batched
    op, which keeps the traced program (and XLA's compile time) small."""
    by_signature: dict[tuple[str, ...], list[int]] = {}
    for w in range(n):
        by_signature.setdefault(tuple(name for name, _ in gates.get(w, [])), []).append(w)
    batched = any(sym is not None and sym.array == "x" for g in gates.values() for _, sym in g)
    lead = (x.shape[0],) if batched else ()
    parts, order = [], []
    flat_theta = theta.reshape(-1)
    for signature, wires in by_signature.items():
        u = jnp.broadcast_to(jnp.eye(2, dtype=dtype), (*lead, len(wires), 2, 2))
        for j, name in enumerate(signature):
            angle = column_angles(name, [gates[w][j][1] for w in wires], x, flat_theta, theta.shape)
            u = jnp.matmul(
                jnp.broadcast_to(_gate(name, angle, dtype), u.shape), u, precision=_HIGHEST
            )
        parts.append(u)
        order.extend(wires)
    mats = jnp.concatenate(parts, axis=-3) if len(parts) > 1 else parts[0]
    if order != list(range(n)):
        mats = jnp.take(mats, np.argsort(order), axis=-3)
    return mats


def _columns(a: jax.Array, index: list[int]) -> jax.Array:
    """``a[..., index]``, as a slice when the indices are consecutive: a gather's gradient is a
    scatter-add, which XLA:CPU runs element by element (slow at a QViT's B*T rows)."""
    if index == list(range(index[0], index[0] + len(index))):
        return a[..., index[0] : index[0] + len(index)]
    return a[..., np.array(index)]


def _wire_groups_with_angles(gates: dict[int, list], n: int, x: jax.Array, theta: jax.Array):
    """[(wires, [(gate name, angles or None), ...])]: wires with the same gate sequence, their
    angles gathered per gate ((B, k) for inputs, (k,) for weights), so each group's gates are
    applied to all its wires at once."""
    flat_theta = theta.reshape(-1)
    by_signature: dict[tuple[str, ...], list[int]] = {}
    for w in range(n):
        by_signature.setdefault(tuple(name for name, _ in gates.get(w, [])), []).append(w)
    groups = []
    for signature, wires in by_signature.items():
        ops = []
        for j, name in enumerate(signature):
            syms = [gates[w][j][1] for w in wires]
            angle = None
            if syms[0] is not None:
                if {s.array for s in syms} != {syms[0].array}:
                    raise ValueError(f"fast simulator: gate {name} mixes input and weight angles")
                if syms[0].array == "x":
                    angle = _columns(x, [s.index[0] for s in syms])
                else:
                    flat = [int(np.ravel_multi_index(s.index, theta.shape)) for s in syms]
                    angle = _columns(flat_theta, flat)
            ops.append((name, angle))
        groups.append((wires, ops))
    return groups


def _in_wire_order(parts: list[jax.Array], order: list[int]) -> jax.Array:
    out = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if order != list(range(len(order))):
        out = jnp.take(out, np.argsort(order), axis=1)
    return out


def _bloch_z(gates: dict[int, list], n: int, x: jax.Array, theta: jax.Array) -> jax.Array:
    """(B, n) <Z> of every wire's gates applied to |0>, by rotating its Bloch vector.

    Real arithmetic even for RX/RZ (an SO(3) rotation per gate), so a product-state circuit
    needs no complex state at all: complex elementwise math and its gradient ran ~4x slower
    on XLA:CPU than this.
    """
    batch = x.shape[0]
    parts, order = [], []
    for wires, ops in _wire_groups_with_angles(gates, n, x, theta):
        k = len(wires)
        bx, by = jnp.zeros((batch, k), x.dtype), jnp.zeros((batch, k), x.dtype)
        bz = jnp.ones((batch, k), x.dtype)
        for name, angle in ops:
            if name == "Hadamard":  # X <-> Z, Y -> -Y
                bx, by, bz = bz, -by, bx
                continue
            c, s = jnp.cos(angle), jnp.sin(angle)
            if name == "RX":
                by, bz = by * c - bz * s, by * s + bz * c
            elif name == "RY":
                bx, bz = bx * c + bz * s, bz * c - bx * s
            else:  # RZ
                bx, by = bx * c - by * s, bx * s + by * c
        parts.append(bz)
        order.extend(wires)
    return _in_wire_order(parts, order)


def _zero_vectors(
    gates: dict[int, list], n: int, x: jax.Array, theta: jax.Array, dtype
) -> jax.Array:
    """(B, n, 2): every wire's gates applied to |0>, as elementwise products.

    What ``_layer_matrices(...)[..., 0]`` gives, without its batch of 2x2 matmuls: with an
    input angle per example that batch is B*n tiny GEMMs, which XLA:CPU runs one by one.
    """
    batch = x.shape[0]
    parts, order = [], []
    for wires, ops in _wire_groups_with_angles(gates, n, x, theta):
        v0 = jnp.ones((batch, len(wires)), dtype)
        v1 = jnp.zeros((batch, len(wires)), dtype)
        for name, angle in ops:
            g = _gate(name, angle, dtype)
            v0, v1 = g[..., 0, 0] * v0 + g[..., 0, 1] * v1, g[..., 1, 0] * v0 + g[..., 1, 1] * v1
        parts.append(jnp.stack([v0, v1], -1))
        order.extend(wires)
    return _in_wire_order(parts, order)


def _zero_pairs(gates: dict[int, list], n: int, x: jax.Array, theta: jax.Array) -> jax.Array:
    """(B, n, 2, 2): every wire's gates applied to |0>, as real (re, im) pairs per amplitude.

    What ``_zero_vectors`` gives for complex gates, in real arithmetic: its complex
    elementwise ops (and their gradients) over the batch ran ~2x slower than the complex
    kernel itself on XLA:CPU at the QViT's sizes.
    """
    batch = x.shape[0]
    parts, order = [], []
    for wires, ops in _wire_groups_with_angles(gates, n, x, theta):
        zero = jnp.zeros((batch, len(wires)), x.dtype)
        ar, ai, br, bi = zero + 1, zero, zero, zero
        merged: list = []  # R_a(s) R_a(t) = R_a(s + t): one cosine and sine per run of gates
        for name, angle in ops:
            if merged and name != "Hadamard" and merged[-1][0] == name:
                merged[-1] = (name, merged[-1][1] + angle)
            else:
                merged.append((name, angle))
        for name, angle in merged:
            if name == "Hadamard":
                h = 1 / np.sqrt(2.0)
                ar, ai, br, bi = h * (ar + br), h * (ai + bi), h * (ar - br), h * (ai - bi)
                continue
            c, s = jnp.cos(angle / 2), jnp.sin(angle / 2)
            if name == "RY":
                ar, ai, br, bi = c * ar - s * br, c * ai - s * bi, s * ar + c * br, s * ai + c * bi
            elif name == "RX":  # [[c, -is], [-is, c]]
                ar, ai, br, bi = c * ar + s * bi, c * ai - s * br, c * br + s * ai, c * bi - s * ar
            else:  # RZ: diag(c - is, c + is)
                ar, ai, br, bi = c * ar + s * ai, c * ai - s * ar, c * br - s * bi, c * bi + s * br
        parts.append(jnp.stack([jnp.stack([ar, ai], -1), jnp.stack([br, bi], -1)], -2))
        order.extend(wires)
    return _in_wire_order(parts, order)


# ----------------------------------------------------------------------------- state ops


def _take(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """Gather along ``axis`` with no bounds handling (the indices are a permutation)."""
    where = (slice(None),) * axis + (index,)
    return x.at[where].get(mode="promise_in_bounds", unique_indices=True)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(state: jax.Array, index: jax.Array, inverse: jax.Array, axis: int) -> jax.Array:
    """Gather by a basis permutation; its VJP is the inverse gather (a scatter-add is slow)."""
    return _take(state, index, axis)


def _permute_fwd(state, index, inverse, axis):
    return _take(state, index, axis), inverse


def _permute_bwd(axis, inverse, g):
    return _take(g, inverse, axis), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def wire_groups(n_qubits: int, size: int) -> list[tuple[int, int]]:
    """Consecutive wire groups (start, length), balanced, none longer than ``size``."""
    count = math.ceil(n_qubits / size)
    base, extra = divmod(n_qubits, count)
    groups, start = [], 0
    for g in range(count):
        k = base + (1 if g < extra else 0)
        groups.append((start, k))
        start += k
    return groups


def _kron(mats: jax.Array) -> jax.Array:
    """Kronecker product of (k, 2, 2) matrices, first wire most significant."""
    out = mats[0]
    for i in range(1, mats.shape[0]):
        out = jnp.kron(out, mats[i])
    return out


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=_HIGHEST)


@jax.custom_vjp
def _apply_first(kron: jax.Array, x: jax.Array) -> jax.Array:
    """(K, 2^k) batch-first view -> (2^k, K): kron contracted with the trailing group axis."""
    return _dot(kron, x, (1, 1))


def _apply_first_fwd(kron, x):
    return _apply_first(kron, x), (kron, x)


def _apply_first_bwd(res, g):
    kron, x = res
    # dkron = g @ x is a plain (2^k, K) @ (K, 2^k) product: the layout the CPU kernels run
    # fastest (autodiff's own choice transposes both operands, measured ~2x slower)
    return _dot(g, x, (1, 0)), _dot(g, kron, (0, 0))


_apply_first.defvjp(_apply_first_fwd, _apply_first_bwd)


@jax.custom_vjp
def _apply_last(kron_t: jax.Array, x: jax.Array) -> jax.Array:
    """(2^k, K) batch-last view -> (K, 2^k): x^T @ kron^T, taking kron already transposed
    (built from transposed 2x2s) so its cotangent is a plain product, never a transpose."""
    return _dot(x, kron_t, (0, 0))


def _apply_last_fwd(kron_t, x):
    return _apply_last(kron_t, x), (kron_t, x)


def _apply_last_bwd(res, g):
    kron_t, x = res
    return _dot(x, g, (1, 0)), _dot(kron_t, g, (1, 1))


_apply_last.defvjp(_apply_last_fwd, _apply_last_bwd)


def _inverse_t(mats: jax.Array) -> jax.Array:
    """(k, 2, 2) -> each matrix's inverse, transposed (closed form)."""
    a, b, c, d = mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1]
    inv_t = jnp.stack([jnp.stack([d, -c], -1), jnp.stack([-b, a], -1)], -2)
    return inv_t / (a * d - b * c)[:, None, None]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rotate_native(mats: jax.Array, x: jax.Array, batch_first: bool) -> jax.Array:
    """One rotation group on the CPU: what ``_apply_first``/``_apply_last`` compute, from the
    group's (k, 2, 2) gates. Its VJP gets each gate's cotangent from a per-wire 2x2 Gram D of
    the output cotangent and the output (the native kernel: one read of each, k+1
    multiply-adds per amplitude) instead of a 2^k x 2^k GEMM: dU = D U^-T, because the
    Kronecker product with U replaced by the unit matrix E_pq is (E_pq U^-1 on that wire) K.
    Reading the output side, not the input cotangent, lets the kernel run beside the GEMM
    that computes that cotangent."""
    if batch_first:
        return _dot(_kron(mats), x, (1, 1))
    return _dot(x, _kron(jnp.swapaxes(mats, -1, -2)), (0, 0))


def _rotate_native_fwd(mats, x, batch_first):
    y = _rotate_native(mats, x, batch_first)
    return y, (mats, y)


def _rotate_native_bwd(batch_first, res, g):
    mats, y = res
    if batch_first:  # y, g (W, K) -> dx (K, W)
        dx = _dot(g, _kron(mats), (0, 0))
    else:  # y, g (K, W) -> dx (W, K)
        dx = _dot(_kron(jnp.swapaxes(mats, -1, -2)), g, (1, 1))
    # g and y as they are: a reshaped view would make XLA recompute y's producer for this call
    out = jax.ShapeDtypeStruct((mats.shape[0], 2, 2), y.dtype)
    gram = jax.ffi.ffi_call(kernels.TARGET, out, vmap_method="sequential")
    return jnp.matmul(gram(g, y, minor=not batch_first), _inverse_t(mats), precision=_HIGHEST), dx


_rotate_native.defvjp(_rotate_native_fwd, _rotate_native_bwd)


def _local_layer(
    state: jax.Array, mats: jax.Array, groups, batch_first: bool, native: bool = False
) -> jax.Array:
    """Apply per-wire 2x2 matrices with one GEMM per group; flips the batch axis' end.

    batch-first (B, 2^n): contract the last group, new axis written first, repeat backwards,
    ending batch-last (2^n, B). batch-last: contract the first group, new axis written last,
    ending batch-first. The flat layouts stay row-major throughout.
    """
    if batch_first:
        for start, k in reversed(groups):
            view = state.reshape(-1, 2**k)
            if native:
                state = _rotate_native(mats[start : start + k], view, True).reshape(-1)
            else:
                state = _apply_first(_kron(mats[start : start + k]), view).reshape(-1)
    else:
        for start, k in groups:
            view = state.reshape(2**k, -1)
            if native:
                state = _rotate_native(mats[start : start + k], view, False).reshape(-1)
            else:
                kron_t = _kron(jnp.swapaxes(mats[start : start + k], -1, -2))
                state = _apply_last(kron_t, view).reshape(-1)
    return state


def _product_state(vectors: jax.Array, batch_first: bool) -> jax.Array:
    """Per-wire (B, k, 2) amplitudes -> flat product state, batch-first or batch-last."""
    batch, k = vectors.shape[0], vectors.shape[1]
    if batch_first:
        state = vectors[:, 0]
        for w in range(1, k):
            state = (state[:, :, None] * vectors[:, w, None, :]).reshape(batch, -1)
    else:
        state = vectors[:, 0].T
        for w in range(1, k):
            state = (state[:, None, :] * vectors[:, w].T[None, :, :]).reshape(-1, batch)
    return state.reshape(-1)


def _product_table(vectors: jax.Array) -> jax.Array:
    """(B, 2^k) product state of k wires, materialised.

    Ending in a (tiny, exact) identity GEMM stops XLA from fusing the k-fold product into
    the permuted-product gather, which would recompute it per amplitude (measured ~10x
    slower at n=19); elementwise tricks and optimization barriers are fused or removed.
    """
    table = _product_state(vectors, True).reshape(vectors.shape[0], -1)
    width = min(8, table.shape[1])
    eye = jnp.eye(width, dtype=table.dtype)
    return jnp.matmul(table.reshape(-1, width), eye, precision=_HIGHEST).reshape(table.shape)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _permuted_product(
    a: jax.Array, c: jax.Array, source: jax.Array, back: jax.Array, low: int, batch_first: bool
) -> jax.Array:
    """(A (x) C)[source]: the product state and the first CNOT network in one pass.

    A is the (B, 2^h) product of the high wires, C the (B, 2^low) product of the low wires.
    Each output amplitude reads A and C (small, cache-resident) at the permuted index. The
    VJP un-permutes the cotangent once (``back``) and contracts it against C and A.
    """
    hi, lo = source >> low, source & ((1 << low) - 1)
    if batch_first:
        return (_take(a, hi, 1) * _take(c, lo, 1)).reshape(-1)
    return (_take(a.T, hi, 0) * _take(c.T, lo, 0)).reshape(-1)


def _permuted_product_fwd(a, c, source, back, low, batch_first):
    return _permuted_product(a, c, source, back, low, batch_first), (a, c, back)


def _permuted_product_bwd(low, batch_first, res, g):
    a, c, back = res
    batch = a.shape[0]
    if batch_first:
        g0 = _take(g.reshape(batch, -1), back, 1).reshape(batch, a.shape[1], -1)
        da = jnp.einsum("bac,bc->ba", g0, c, precision=_HIGHEST)
        dc = jnp.einsum("bac,ba->bc", g0, a, precision=_HIGHEST)
    else:
        g0 = _take(g.reshape(-1, batch), back, 0).reshape(a.shape[1], -1, batch)
        da = jnp.einsum("acb,bc->ba", g0, c, precision=_HIGHEST)
        dc = jnp.einsum("acb,ba->bc", g0, a, precision=_HIGHEST)
    return da, dc, None, None


_permuted_product.defvjp(_permuted_product_fwd, _permuted_product_bwd)


def _sign_tables(n: int, masks: np.ndarray, dtype) -> tuple[int, np.ndarray, np.ndarray]:
    """Split b = (high h bits, low n-h bits): (-1)^{b.m} = (-1)^{high.m_h} (-1)^{low.m_l}."""
    h = n // 2
    low_bits = n - h
    ints = _bits_to_index(masks.astype(np.int64))  # (n,)

    def table(bits: int, part: np.ndarray) -> np.ndarray:
        idx = np.arange(2**bits, dtype=np.int64)[:, None] & part[None, :]
        return (1 - 2 * (_popcount(idx) & 1)).astype(dtype)

    return h, table(h, ints >> low_bits), table(low_bits, ints & ((1 << low_bits) - 1))


def _popcount(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    count = np.zeros_like(a)
    while np.any(a):
        count += a & 1
        a >>= 1
    return count


def _measure(probs: jax.Array, batch: int, n: int, tables, batch_first: bool) -> jax.Array:
    """<Z_i> = sum_b p(b) s_high(b_high, i) s_low(b_low, i) -> (B, n)."""
    h, high, low = tables
    if batch_first:
        q = lax.dot_general(
            probs.reshape(batch * 2**h, 2 ** (n - h)),
            jnp.asarray(low),
            (((1,), (0,)), ((), ())),
            precision=_HIGHEST,
        )
        return jnp.einsum(
            "bhi,hi->bi", q.reshape(batch, 2**h, n), jnp.asarray(high), precision=_HIGHEST
        )
    t = lax.dot_general(
        jnp.asarray(high), probs.reshape(2**h, -1), (((0,), (0,)), ((), ())), precision=_HIGHEST
    )  # (n, 2^l * B)
    return jnp.einsum(
        "ilb,li->bi", t.reshape(n, 2 ** (n - h), batch), jnp.asarray(low), precision=_HIGHEST
    )


# ----------------------------------------------------------------------------- whole circuit


def _state_kernel_fits(plan: _Plan) -> bool:
    """Whether the whole-circuit kernel runs this plan: real amplitudes, at least 4 wires (the
    widest vector's lanes), and after the prefix alternating CNOT networks and rotation layers."""
    kinds = [kind for kind, _ in plan.steps]
    return (
        plan.real
        and plan.n_qubits >= 4
        and len(kinds) >= 2
        and kinds == ["cnot", "local"] * (len(kinds) // 2)
    )


def _state_kernel(plan: _Plan) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(vectors, mats) -> (B, n)`` <Z_i> by :mod:`qtl.quantum.kernels` (``statevector.cc``).

    ``vectors`` (B, n, 2) is every wire's state after the prefix, ``mats`` (m, n, 2, 2) the
    rotation layers, or (B, m, n, 2, 2) each row's own (the noise trajectories' layers with
    their Paulis folded in, :mod:`qtl.quantum.noise.pauli_frame`). The kernel takes each
    example's state through every layer in cache and returns, in the backward pass, the
    cotangent of ``vectors`` and each gate's 2x2 Gram D (per row); dU = D U^-T, as in
    ``_rotate_native``.
    """
    n = plan.n_qubits
    cnots = [pairs for kind, pairs in plan.steps if kind == "cnot"] + [plan.folded]
    maps = [network_indices(n, pairs) for pairs in cnots]
    nets = np.stack([_network_columns(g) for g, _ in maps])
    inv = np.stack([_network_columns(i) for _, i in maps])
    forward, backward = kernels.statevector_targets()

    @jax.custom_vjp
    def run(vectors, mats):
        out = jax.ShapeDtypeStruct((vectors.shape[0], n), jnp.float32)
        return jax.ffi.ffi_call(forward, out, vmap_method="sequential")(vectors, mats, nets)

    def run_fwd(vectors, mats):
        return run(vectors, mats), (vectors, mats)

    def run_bwd(res, g):
        vectors, mats = res
        shapes = (
            jax.ShapeDtypeStruct(vectors.shape, jnp.float32),
            jax.ShapeDtypeStruct((vectors.shape[0], *mats.shape[-4:]), jnp.float32),
        )
        call = jax.ffi.ffi_call(backward, shapes, vmap_method="sequential")
        dvectors, gram = call(vectors, mats, nets, inv, g.astype(jnp.float32))
        flat = mats.reshape(-1, 2, 2)
        gram = gram if mats.ndim == 5 else gram.sum(0)  # a row's own layers: its own Grams
        dmats = jnp.matmul(gram.reshape(-1, 2, 2), _inverse_t(flat), precision=_HIGHEST)
        return dvectors, dmats.reshape(mats.shape)

    run.defvjp(run_fwd, run_bwd)
    return run


def row_state_kernel(spec: CircuitSpec) -> tuple[_Plan, Callable] | None:
    """A whole-circuit kernel taking one set of layer matrices per row, float32, with the
    adjoint gradient of both inputs: ``(plan, f(vectors, mats) -> (R, n))``. Real circuits
    (``statevector.cc``): vectors (R, n, 2), mats (R, m, n, 2, 2); complex ones
    (``complex_circuit.cc``, ``plan.real`` False): vectors (R, n, 2, 2) and mats
    (R, m, n, 2, 2, 2) as (re, im) pairs. None where neither runs this circuit here (another
    shape of plan, a real circuit of fewer than 4 wires, no native kernels on this backend)."""
    plan = compile_plan(spec)
    if not native_ok():
        return None
    if _state_kernel_fits(plan) and kernels.statevector_targets():
        return plan, _state_kernel(plan)
    if _complex_kernel_fits(plan) and kernels.complex_targets():
        return plan, _complex_kernel(plan)
    return None


COMPLEX_KERNEL_QUBITS = 20  # complex_circuit.cc: a group of 8 rows' state is 2^n x 64 bytes
_COMPLEX_SLOTS = 16  # gradient slices of the complex kernel's backward (summed here)


def _complex_kernel_fits(plan: _Plan) -> bool:
    """Whether the complex-circuit kernel runs this plan: complex amplitudes (RX/RZ gates),
    2-20 wires, and after the prefix alternating CNOT networks and rotation layers."""
    kinds = [kind for kind, _ in plan.steps]
    return (
        not plan.real
        and 2 <= plan.n_qubits <= COMPLEX_KERNEL_QUBITS
        and len(kinds) >= 2
        and kinds == ["cnot", "local"] * (len(kinds) // 2)
    )


def _complex_kernel(
    plan: _Plan, angles: bool = False
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(vectors, mats) -> (B, n)`` <Z_i> by ``complex_circuit.cc`` (:mod:`qtl.quantum.kernels`).

    ``vectors`` (B, n, 2, 2) is every wire's state after the prefix and ``mats``
    (m, n, 2, 2, 2) the rotation layers (or (B, m, n, 2, 2, 2), each row's own), complex
    numbers as (re, im) pairs, so the custom VJP is over real arrays (the kernel returns
    d/dre + i d/dim, which is that VJP) and JAX's autodiff takes it back through
    ``.real``/``.imag`` to the angles. The kernel runs groups of 8 rows in SIMD lanes and the
    adjoint method by undoing each (unitary) gate.

    ``vectors`` may also be (B, n), each wire's RX angle after an all-RX prefix (the QViT's
    encoding): the kernel builds RX(a)|0> itself and returns d/da.

    ``angles=True`` (every layer one RX per wire, the QViT's): ``f(vectors, t)`` with ``t``
    (m, n) the RX angles; the kernel keeps each layer's output from its forward and takes
    every gate's gradient against its angle at the layer's output (the layer's gates
    commute), so the backward never undoes the state. With the RX encoding's angles as
    ``vectors`` too (the QViT's whole circuit), it runs in the Hadamard basis instead, where
    each RX layer is one diagonal and every gradient a sum over amplitudes (docs/simulator.md
    has the A/B of each).
    """
    n = plan.n_qubits
    cnots = [pairs for kind, pairs in plan.steps if kind == "cnot"] + [plan.folded]
    maps = [network_indices(n, pairs) for pairs in cnots]
    nets = np.stack([_network_columns(g) for g, _ in maps])
    inv = np.stack([_network_columns(i) for _, i in maps])
    forward, backward = kernels.complex_targets()

    def matrices(params: jax.Array) -> jax.Array:
        return _rx_pairs(params) if angles else params

    @jax.custom_vjp
    def run(vectors, params):
        out = jax.ShapeDtypeStruct((vectors.shape[0], n), jnp.float32)
        call = jax.ffi.ffi_call(forward, out, vmap_method="sequential")
        return call(vectors, matrices(params), nets)

    def run_fwd(vectors, params):
        return run(vectors, params), (vectors, params)

    def run_bwd(res, g):
        vectors, params = res
        mats = matrices(params)
        per_row = mats.ndim == 6  # each row's own layers: the kernel returns each row's gradient
        slots = params.shape if per_row else (_COMPLEX_SLOTS, *params.shape)
        shapes = (
            jax.ShapeDtypeStruct(vectors.shape, jnp.float32),
            jax.ShapeDtypeStruct(slots, jnp.float32),
        )
        call = jax.ffi.ffi_call(backward, shapes, vmap_method="sequential")
        dvectors, gram = call(vectors, mats, nets, inv, g.astype(jnp.float32))
        return dvectors, gram if per_row else gram.sum(0)

    run.defvjp(run_fwd, run_bwd)
    return run


def _rx_pairs(t: jax.Array) -> jax.Array:
    """(..., 2, 2, 2) RX(t) matrices as (re, im) pairs, their zeros exact (the kernel reads
    the gate kind from them)."""
    c, s = jnp.cos(t / 2), jnp.sin(t / 2)
    zero = jnp.zeros_like(c)
    diag, off = jnp.stack([c, zero], -1), jnp.stack([zero, -s], -1)
    return jnp.stack([jnp.stack([diag, off], -2), jnp.stack([off, diag], -2)], -3)


def _rx_only(layers: list[dict[int, list]], n: int) -> bool:
    """Whether every layer is RX gates on every wire, weight-angled (the QViT's circuits): the
    complex kernel then takes gradients against the angles."""
    return all(
        set(range(n)) <= set(gates)
        and all(
            name == "RX" and sym is not None and sym.array == "theta"
            for w in range(n)
            for name, sym in gates[w]
        )
        for gates in layers
    )


def _rx_angles(layers: list[dict[int, list]], n: int, theta: jax.Array) -> jax.Array:
    """(m, n): each wire's RX angle per layer (a run of RX gates on one wire is one RX of their
    sum), as a 0/1 matrix times the weights: exact, and its gradient is the transpose."""
    select = np.zeros((len(layers), n, theta.size), np.float32)
    for layer, gates in enumerate(layers):
        for w in range(n):
            for _, sym in gates[w]:
                select[layer, w, np.ravel_multi_index(sym.index, theta.shape)] += 1
    return jnp.einsum("lwk,k->lw", select, theta.reshape(-1), precision=_HIGHEST)


def _rx_prefix(prefix: dict[int, list], n: int) -> bool:
    """Whether every wire's prefix is RX gates only, each reading an input or a weight (the
    QViT's encoding RX(x_w), with the first layer's RX(theta_w) merged into it): the complex
    kernel then takes each wire's summed angle and builds RX(a)|0> itself."""
    return set(range(n)) <= set(prefix) and all(
        prefix[w] and all(name == "RX" and sym is not None for name, sym in prefix[w])
        for w in range(n)
    )


def _prefix_angles(prefix: dict[int, list], n: int, x: jax.Array, theta: jax.Array) -> jax.Array:
    """(B, n): each wire's prefix angle, the sum of its RX gates' inputs and weights."""
    x_select = np.zeros((x.shape[1], n), np.float32)
    t_select = np.zeros((theta.size, n), np.float32)
    for w in range(n):
        for _, sym in prefix[w]:
            if sym.array == "x":
                x_select[sym.index[0], w] += 1
            else:
                t_select[np.ravel_multi_index(sym.index, theta.shape), w] += 1
    from_x = (
        x if np.array_equal(x_select, np.eye(n)) else jnp.matmul(x, x_select, precision=_HIGHEST)
    )
    return from_x + jnp.matmul(theta.reshape(-1), t_select, precision=_HIGHEST)


def _pairs(z: jax.Array) -> jax.Array:
    """A complex array as float32 (..., 2) (re, im) pairs."""
    return jnp.stack([jnp.real(z), jnp.imag(z)], -1).astype(jnp.float32)


# ----------------------------------------------------------------------------- the simulator


def fast_circuit(
    spec: CircuitSpec,
    *,
    group: int | None = None,
    max_state_mb: float | None = None,
    layout: str | None = None,
    native: bool | str = True,
    phase: bool = False,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(x (B, n), theta) -> (B, n)`` <Z_i>; the circuit of :func:`dqc_ansatz` for ``spec``.

    ``group``: wires per fused rotation GEMM (default: by qubit count). ``max_state_mb``: the
    batch goes through the circuit in chunks whose state vectors stay below this size, each
    chunk rematerialised in the backward pass. ``None`` picks by device: on a CPU, 8 MB
    chunks that stay in cache (at n=19, 4 examples a chunk: ~10% faster than 4 MB chunks and
    faster than one 64 MB batch, whose buffers are page-faulted in every step); on a GPU, a
    bound that only splits when memory would run out. ``layout``: "first" | "last" forces
    where the batch axis starts (a tuning knob; by default it ends batch-first). ``native``:
    the C++ kernels of :mod:`qtl.quantum.kernels` where they apply (real float32 circuits on
    the CPU, where they build): ``True`` runs the whole circuit in one kernel (one example's
    state at a time, in cache; ``max_state_mb`` and ``layout`` then do not apply) and falls
    back to the per-layer path with the Gram kernel for plans it does not take (complex
    float32 plans with a state run the complex-circuit kernel instead); ``"gram"``
    keeps XLA's per-layer ops with only the rotation gradients native; ``False``: XLA only.
    ``phase``: RX + CNOT circuits with a state run as a real phase polynomial
    (:mod:`qtl.quantum.phase`): exact, but through XLA:CPU's cosines measured 2-4x slower than
    the complex path at the QViT's sizes (docs/simulator.md), so off by default.
    """
    if native not in (True, False, "gram"):
        raise ValueError(f"fast simulator: native={native!r} is not one of True, False, 'gram'")
    if spec.n_qubits > MAX_QUBITS:
        raise ValueError(
            f"fast simulator: {spec.n_qubits} qubits is more than it supports ({MAX_QUBITS}): "
            "basis indices are int32, and one example's state would need "
            f"{2**spec.n_qubits * 4 / 2**30:.0f} GiB"
        )
    plan = compile_plan(spec)
    n = spec.n_qubits
    group = group or default_group(n)
    groups = wire_groups(n, group)
    perms = {
        i: network_indices(n, pairs) for i, (kind, pairs) in enumerate(plan.steps) if kind == "cnot"
    }
    masks = cnot_network_matrix(n, plan.folded).astype(bool)
    n_local = sum(kind == "local" for kind, _ in plan.steps)
    # start so the state is batch-first at the end: the measurement GEMM is then the larger one
    start_batch_first = n_local % 2 == 0 if layout is None else layout == "first"

    def product_parity(x: jax.Array, theta: jax.Array) -> jax.Array:
        zw = _bloch_z(plan.prefix, n, x, theta)  # <Z_w> of U|0> per wire
        # <prod_{w in mask_i} Z_w> on a product state = prod_{w in mask_i} <Z_w>
        return jnp.prod(jnp.where(jnp.asarray(masks)[None], zw[:, None, :], 1.0), axis=-1)

    def core(x: jax.Array, theta: jax.Array, index: dict) -> jax.Array:
        real = x.dtype
        dtype = real if plan.real else (jnp.complex128 if real == jnp.float64 else jnp.complex64)
        use_native = bool(native) and dtype == jnp.float32 and native_ok()
        batch = x.shape[0]
        vectors = _zero_vectors(plan.prefix, n, x, theta, dtype)  # U|0> per wire
        batch_first = start_batch_first
        steps = list(enumerate(plan.steps))
        if steps and steps[0][1][0] == "cnot":  # product state + first network in one pass
            h = n // 2
            a = _product_table(vectors[:, :h])
            c = _product_table(vectors[:, h:])
            state = _permuted_product(a, c, *index[0], n - h, batch_first)
            steps = steps[1:]
        else:
            state = _product_state(vectors, batch_first)
        for i, (kind, payload) in steps:
            if kind == "cnot":
                shape = (batch, -1) if batch_first else (-1, batch)
                axis = 1 if batch_first else 0
                state = _permute(state.reshape(shape), *index[i], axis).reshape(-1)
            else:
                mats = _layer_matrices(payload, n, x, theta, dtype)
                state = _local_layer(state, mats, groups, batch_first, use_native)
                batch_first = not batch_first
        probs = state * state if plan.real else jnp.real(state * jnp.conj(state))
        tables = _sign_tables(n, masks, real)
        return _measure(probs.astype(real), batch, n, tables, batch_first)

    state_bytes = 2**n * (4 if plan.real else 8)

    # RX + CNOT circuits with a state (the QViT's at 2+ layers): a real phase polynomial
    from qtl.quantum.phase import phase_circuit

    phase = phase_circuit(spec) if plan.steps and phase else None
    if phase is not None:  # per example: the phases (2^n) and n 2^(n-1) cosines and differences
        state_bytes = 4 * 2**n * (2 + n)

    state_fits = native is True and _state_kernel_fits(plan)
    state_kernel: list = []  # built at the first float32 CPU call (after the kernels load)
    layers = [gates for kind, gates in plan.steps if kind == "local"]

    def whole_circuit(x: jax.Array, theta: jax.Array) -> jax.Array:
        if not state_kernel:
            state_kernel.append(_state_kernel(plan))
        vectors = _zero_vectors(plan.prefix, n, x, theta, jnp.float32)  # U|0> per wire
        mats = jnp.stack([_layer_matrices(g, n, x, theta, jnp.float32) for g in layers])
        return state_kernel[0](vectors, mats)

    complex_fits = native is True and _complex_kernel_fits(plan)
    complex_kernel: list = []
    rx_only = _rx_only(layers, n)
    rx_prefix = _rx_prefix(plan.prefix, n)

    def whole_complex(x: jax.Array, theta: jax.Array) -> jax.Array:
        if not complex_kernel:
            complex_kernel.append(_complex_kernel(plan, angles=rx_only))
        if rx_prefix:  # the kernel builds RX(a)|0> from each wire's angle (B, n)
            vectors = _prefix_angles(plan.prefix, n, x, theta)
        else:
            vectors = _zero_pairs(plan.prefix, n, x, theta)  # U|0> per wire, (re, im) pairs
        if rx_only:
            return complex_kernel[0](vectors, _rx_angles(layers, n, theta))
        # the layers' matrices take weights only: (m, n, 2, 2), complex is cheap there
        mats = jnp.stack([_layer_matrices(g, n, x, theta, jnp.complex64) for g in layers])
        return complex_kernel[0](vectors, _pairs(mats))

    def run(x: jax.Array, theta: jax.Array) -> jax.Array:
        squeeze = x.ndim == 1
        x2 = x[None] if squeeze else x
        batch = x2.shape[0]
        if not plan.steps:  # no state vector: nothing to chunk
            z = product_parity(x2, theta).astype(x.dtype)
            return z[0] if squeeze else z
        if state_fits and x2.dtype == jnp.float32 and native_ok():
            z = whole_circuit(x2, theta.astype(jnp.float32))
            return z[0] if squeeze else z
        if complex_fits and x2.dtype == jnp.float32 and native_ok() and phase is None:
            z = whole_complex(x2, theta.astype(jnp.float32))
            return z[0] if squeeze else z
        # index maps built once per call, outside the chunk loop (not re-derived per chunk)
        index = (
            {i: (gf2_index(n, g), gf2_index(n, inv)) for i, (g, inv) in perms.items()}
            if phase is None
            else {}
        )
        budget = max_state_mb if max_state_mb is not None else default_state_mb()
        chunk = max(1, int(budget * 2**20 // state_bytes))
        fn = phase if phase is not None else partial(_with_index, core, index)
        if batch <= chunk:
            z = fn(x2, theta)
        else:
            chunks = -(-batch // chunk)
            padded = jnp.pad(x2, ((0, chunks * chunk - batch), (0, 0)))
            step = jax.checkpoint(lambda xc: fn(xc, theta))
            z = lax.map(step, padded.reshape(chunks, chunk, n)).reshape(-1, n)[:batch]
        z = z.astype(x.dtype)
        return z[0] if squeeze else z

    return run


def _with_index(core: Callable, index: dict, x: jax.Array, theta: jax.Array) -> jax.Array:
    return core(x, theta, index)


def native_ok() -> bool:
    """Whether the native kernels run here: a CPU backend where they build."""
    return jax.default_backend() == "cpu" and kernels.wire_gram_target() is not None


def default_state_mb() -> float:
    """Chunk bound for ``max_state_mb=None``: cache-sized on CPU, memory-sized elsewhere."""
    return 8.0 if jax.default_backend() == "cpu" else 2048.0


def default_group(n_qubits: int) -> int:
    """Wires per rotation GEMM: 2^k-wide GEMMs are compute-cheap and memory-bound up to k~5."""
    return 5 if n_qubits > 10 else max(1, min(n_qubits, 5))
