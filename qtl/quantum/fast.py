"""A state-vector simulator specialised for the DQC circuit family (``head.simulator=fast``).

Why it is fast, and still exact:
- every gate is real (H, RY, CNOT), so amplitudes are float32 reals, not complex64 pairs;
- H, RY(x) and the first RY(theta) layer act on |0...0> as a product state, built in one
  pass (RY(a)RY(b) = RY(a + b), so x and the first theta merge into one angle per wire);
- a CNOT network is a permutation of basis states: one gather, whose gradient is the gather
  by the inverse permutation (no scatter);
- a later RY layer is a Kronecker product of 2x2 matrices, applied as a few dense matrix
  products on groups of wires;
- <Z_i> after the last CNOT network equals the parity of a set of bits measured before it,
  so the last permutation is never applied.

Wire 0 is the most significant bit of the basis index, as in PennyLane. Equality with the
PennyLane reference (outputs and gradients) is tested in ``tests/test_fast_sim.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qtl.quantum.circuit import ring_pairs


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


def permutation(n_qubits: int, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(gather, inverse gather): new_state = state[gather] applies the CNOT network."""
    m = cnot_network_matrix(n_qubits, pairs)
    index = np.arange(2**n_qubits, dtype=np.int64)
    bits = (index[:, None] >> np.arange(n_qubits - 1, -1, -1)) & 1
    image = _bits_to_index((bits @ m.T) % 2)  # basis state b -> M b
    gather = np.empty_like(image)
    gather[image] = index  # new[M b] = old[b]
    return gather.astype(np.int32), image.astype(np.int32)


def parity_masks(n_qubits: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """mask[i]: the input bits whose parity is output bit i of the network (row i of M)."""
    return cnot_network_matrix(n_qubits, pairs).astype(bool)


def _permutation_op(gather: np.ndarray, inverse: np.ndarray) -> Callable[[jax.Array], jax.Array]:
    """Gather along the last axis; its VJP is the inverse gather (a scatter-add is slow)."""

    @jax.custom_vjp
    def permute(state: jax.Array) -> jax.Array:
        return jnp.take(state, gather, axis=-1)

    def fwd(state: jax.Array) -> tuple[jax.Array, None]:
        return permute(state), None

    def bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
        return (jnp.take(g, inverse, axis=-1),)

    permute.defvjp(fwd, bwd)
    return permute


def _ry(angle: jax.Array) -> jax.Array:
    c, s = jnp.cos(angle / 2), jnp.sin(angle / 2)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def _groups(n_qubits: int, size: int) -> list[tuple[int, int]]:
    """Consecutive wire groups (start, length) for the fused rotation matmuls."""
    return [(s, min(size, n_qubits - s)) for s in range(0, n_qubits, size)]


def _apply_rotation_layer(state: jax.Array, angles: jax.Array, group: int) -> jax.Array:
    """RY(angles[i]) on every wire i: one dense (2^k x 2^k) product per group of k wires."""
    batch = state.shape[0]
    n = angles.shape[0]
    for start, k in _groups(n, group):
        mat = _ry(angles[start])
        for w in range(start + 1, start + k):
            mat = jnp.kron(mat, _ry(angles[w]))
        left, right = 2**start, 2 ** (n - start - k)
        s = state.reshape(batch * left, 2**k, right)
        state = jnp.einsum("jk,akr->ajr", mat, s).reshape(batch, -1)
    return state


def _product_state(angles: jax.Array) -> jax.Array:
    """(B, n) angles of RY(a) H |0> per wire -> (B, 2^n) product state."""
    c, s = jnp.cos(angles / 2), jnp.sin(angles / 2)
    q0 = (c - s) / np.sqrt(2.0)
    q1 = (s + c) / np.sqrt(2.0)
    qubits = jnp.stack([q0, q1], -1)  # (B, n, 2)
    state = qubits[:, 0]
    for w in range(1, angles.shape[1]):
        state = (state[:, :, None] * qubits[:, w, None, :]).reshape(state.shape[0], -1)
    return state


def _parity_expectations(probs: jax.Array, masks: np.ndarray) -> jax.Array:
    """<Z_i> = sum_b p(b) (-1)^popcount(b & mask_i), the sign table built on the device."""
    mask_ints = _bits_to_index(masks.astype(np.int64)).astype(np.int32)  # (n,)
    index = jax.lax.iota(jnp.int32, probs.shape[-1])
    parity = jax.lax.population_count(index[:, None] & jnp.asarray(mask_ints)[None, :]) & 1
    signs = 1.0 - 2.0 * parity.astype(probs.dtype)  # (2^n, n)
    return probs @ signs


def fast_circuit(
    n_qubits: int, pairs: list[tuple[int, int]] | None = None, *, group: int = 5
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(x, theta) -> (B, n)`` <Z_i>, same circuit as :func:`qtl.quantum.circuit.dqc_ansatz`."""
    pairs = ring_pairs(n_qubits) if pairs is None else pairs
    permute = _permutation_op(*permutation(n_qubits, pairs))
    masks = parity_masks(n_qubits, pairs)

    def run(x: jax.Array, theta: jax.Array) -> jax.Array:
        depth = theta.shape[0]
        squeeze = x.ndim == 1
        x2 = x[None] if squeeze else x
        state = _product_state(x2 + theta[0][None, :])
        for layer in range(1, depth):
            state = permute(state)
            state = _apply_rotation_layer(state, theta[layer], group)
        z = _parity_expectations(state * state, masks).astype(x.dtype)
        return z[0] if squeeze else z

    return run
