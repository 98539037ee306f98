"""simulator=fast equals the PennyLane reference: outputs and gradients, through the head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qtl.config import HeadConfig, HeadName, Simulator
from qtl.models.heads import DQCHead
from qtl.quantum.circuit import pennylane_circuit, ring_pairs
from qtl.quantum.fast import cnot_network_matrix, fast_circuit


def test_ring_network_is_prefix_xor_with_wrap():
    m = cnot_network_matrix(4, ring_pairs(4))
    # out_k = b_0 ^ ... ^ b_k for k >= 1; out_0 = b_1 ^ ... ^ b_{n-1}
    np.testing.assert_array_equal(m, [[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


@pytest.mark.parametrize("n,depth", [(2, 1), (3, 3), (5, 1), (5, 3), (8, 3), (13, 1)])
def test_fast_equals_pennylane_outputs(n, depth):
    rng = np.random.default_rng(100 + n * depth)
    x = jnp.asarray(rng.uniform(-np.pi / 2, np.pi / 2, (3, n)), jnp.float32)
    theta = jnp.asarray(rng.normal(0, 2 * np.pi, (depth, n)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(fast_circuit(n))(x, theta)),
        np.asarray(jax.jit(pennylane_circuit(n))(x, theta)),
        atol=1e-5,
    )


@pytest.mark.parametrize("n,depth", [(3, 3), (8, 3)])
def test_fast_equals_pennylane_gradients_through_head(n, depth):
    """d(BCE)/d(every parameter and the input features) agree between simulators."""
    feats = jax.random.normal(jax.random.key(0), (4, 10))
    labels = (jax.random.uniform(jax.random.key(1), (4, n)) < 0.3).astype(jnp.float32)
    grads = {}
    for sim in (Simulator.fast, Simulator.pennylane):
        head = DQCHead(
            10, n, HeadConfig(name=HeadName.dqc, depth=depth, simulator=sim), rngs=nnx.Rngs(3)
        )
        graph, params = nnx.split(head)

        def loss(p, f, graph=graph):
            return optax.sigmoid_binary_cross_entropy(nnx.merge(graph, p)(f), labels).mean()

        grads[sim] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, feats)
    flat_fast = jax.tree_util.tree_leaves_with_path(grads[Simulator.fast])
    flat_ref = jax.tree_util.tree_leaves(grads[Simulator.pennylane])
    for (path, a), b in zip(flat_fast, flat_ref, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
