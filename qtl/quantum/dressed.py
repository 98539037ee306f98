"""The dressed head as a pure function of a parameter dict, for benchmarks and exactness tests.

Same maths as :class:`qtl.models.heads.DQCHead` (Linear -> tanh*pi/2 -> circuit -> Linear,
BCE on logits), without a module, so a reference can run it in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtl.quantum.circuit import CircuitSpec


def init_params(
    rng: np.random.Generator, spec: CircuitSpec, features: int
) -> dict[str, np.ndarray]:
    """Random head parameters (numpy float64; cast as needed)."""
    n = spec.n_qubits
    return {
        "pre_w": rng.normal(size=(features, n)) / np.sqrt(features),
        "pre_b": rng.normal(0, 0.1, n),
        "theta": rng.normal(0, 2 * np.pi, spec.theta_shape),
        "post_w": rng.normal(size=(n, n)) / np.sqrt(n),
        "post_b": rng.normal(0, 0.1, n),
    }


def head_loss(circuit: Callable[[jax.Array, jax.Array], jax.Array]):
    """``loss(params, features, labels)``: mean BCE of the dressed head's logits."""

    def loss(params: dict, features: jax.Array, labels: jax.Array) -> jax.Array:
        angles = jnp.tanh(features @ params["pre_w"] + params["pre_b"]) * (jnp.pi / 2)
        z = circuit(angles, params["theta"])
        logits = z @ params["post_w"] + params["post_b"]
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    return loss
