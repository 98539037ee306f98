"""The heads are exactly the study's (Chan et al., §III and Table I): checked against an
independent NumPy state vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtl.config import HeadConfig, HeadName, ThetaInit
from qtl.models.heads import CDLHead, DQCHead
from qtl.quantum.circuit import CircuitSpec, init_theta, pennylane_circuit


def numpy_circuit(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """<Z_i> of H, RY(x); depth x [RY(theta) layer, CNOT ring] — a plain float64 simulation."""
    depth, n = theta.shape
    out = []
    for xb in x:
        psi = np.zeros((2,) * n)
        psi[(0,) * n] = 1.0

        def apply(psi, gate, wire):
            return np.moveaxis(np.tensordot(gate, psi, axes=([1], [wire])), 0, wire)

        def ry(a):
            c, s = np.cos(a / 2), np.sin(a / 2)
            return np.array([[c, -s], [s, c]])

        h = np.array([[1, 1], [1, -1]]) / np.sqrt(2)
        for w in range(n):
            psi = apply(psi, h, w)
            psi = apply(psi, ry(xb[w]), w)
        for layer in range(depth):
            for w in range(n):
                psi = apply(psi, ry(theta[layer, w]), w)
            for w in range(n):
                c, t = w, (w + 1) % n
                idx = [slice(None)] * n
                idx[c] = 1
                sub = psi[tuple(idx)].copy()  # control = 1 block
                t_axis = t if t < c else t - 1
                psi[tuple(idx)] = np.flip(sub, axis=t_axis)
        probs = psi**2
        z = [probs.take(0, axis=w).sum() - probs.take(1, axis=w).sum() for w in range(n)]
        out.append(z)
    return np.array(out)


@pytest.mark.parametrize("n,depth", [(2, 1), (3, 2), (5, 3)])
def test_pennylane_circuit_matches_independent_simulation(n, depth):
    rng = np.random.default_rng(n * 10 + depth)
    x = rng.uniform(-np.pi / 2, np.pi / 2, (3, n)).astype(np.float32)
    theta = rng.normal(0, 2 * np.pi, (depth, n)).astype(np.float32)
    got = np.asarray(
        jax.jit(pennylane_circuit(CircuitSpec(n, depth)))(jnp.asarray(x), jnp.asarray(theta))
    )
    assert got.shape == (3, n)
    np.testing.assert_allclose(got, numpy_circuit(x, theta), atol=2e-5)


def test_dqc_head_is_dressed_circuit():
    cfg = HeadConfig(name=HeadName.dqc, depth=3)
    head = DQCHead(12, 4, cfg, rngs=nnx.Rngs(0))
    feats = jax.random.normal(jax.random.key(1), (5, 12))
    pre = feats @ head.pre.kernel[...] + head.pre.bias[...]
    angles = np.tanh(np.asarray(pre)) * np.pi / 2
    z = numpy_circuit(angles, np.asarray(head.theta[...]))
    expected = z @ np.asarray(head.post.kernel[...]) + np.asarray(head.post.bias[...])
    np.testing.assert_allclose(np.asarray(head(feats)), expected, atol=1e-4)
    assert head.theta[...].shape == (3, 4)


def test_dqc_gradients_reach_every_parameter():
    head = DQCHead(6, 3, HeadConfig(name=HeadName.dqc, depth=2), rngs=nnx.Rngs(0))
    graph, params = nnx.split(head)
    feats = jax.random.normal(jax.random.key(2), (4, 6))

    def loss(p):
        return nnx.merge(graph, p)(feats).sum()

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).sum() > 0, jax.tree_util.keystr(path)


def test_cdl_head_gives_logits_of_one_linear_map():
    """Logits, not probabilities: the loss applies the sigmoid (BCE on logits, as in Chan et
    al. §III-F)."""
    head = CDLHead(16, 5, rngs=nnx.Rngs(0))
    feats = 10.0 * jax.random.normal(jax.random.key(3), (7, 16))
    expected = np.asarray(feats) @ np.asarray(head.fc.kernel[...]) + np.asarray(head.fc.bias[...])
    got = np.asarray(head(feats))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert np.abs(got).max() > 1.0  # unbounded: no sigmoid/tanh inside the head


def test_theta_init_schemes():
    key = jax.random.key(0)
    normal = np.asarray(init_theta(key, (200, 50), ThetaInit.normal.value))
    uniform = np.asarray(init_theta(key, (200, 50), ThetaInit.uniform.value))
    assert abs(normal.std() - 2 * np.pi) < 0.2
    assert uniform.min() >= 0 and uniform.max() < 2 * np.pi and abs(uniform.mean() - np.pi) < 0.1
