"""Finite shots: <Z_i> estimated from measured bitstrings, and gradients that hardware could take.

Sampling. Each qubit's estimate is drawn from its own marginal: with p_i = (1 - <Z_i>)/2 the
probability of reading 1, ``shots`` bitstrings give <Z_i>^ = 1 - 2 k_i / shots with
k_i ~ Binomial(shots, p_i). That is the exact law of every single qubit's estimate from S
joint bitstrings (a marginal of a multinomial is a binomial), so each estimate is unbiased
with variance (1 - <Z_i>^2) / shots. What it drops is the correlation between qubits' estimates
that reading them from the same bitstrings creates; it needs only <Z> (any simulator, the
native kernels included), not the 2^n probabilities, and costs O(B n) per call.

Gradients (``gradient``):
- ``adjoint``: the forward value is sampled, the backward pass is the simulator's exact
  gradient of <Z> (straight-through: <Z>^ = <Z> + stop_gradient(<Z>^ - <Z>)). Given the sampled
  forward, it is the expectation of the parameter-shift estimate below: same mean, none of its
  shot variance, one circuit evaluation per step. Like parameter shift, the loss gradient is
  still evaluated at the sampled <Z>^ (a nonlinear loss makes both biased by the same amount).
- ``parameter_shift``: for every gate angle a (each input angle and each weight appears in
  exactly one RX/RY/RZ), d<Z>/da = (<Z>(a + pi/2) - <Z>(a - pi/2)) / 2 with each shifted circuit
  sampled with its own keys: unbiased for the Jacobian, 2 (n + P) circuit evaluations per step
  (P weights), which is what hardware pays.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Forward = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x, theta, key) -> (B, n)
SHIFT = jnp.pi / 2


def sample_z(z: jax.Array, shots: int, key: jax.Array) -> jax.Array:
    """<Z>^ from ``shots`` bitstrings per row, each qubit binomial on its marginal (see module)."""
    p1 = jnp.clip((1.0 - z.astype(jnp.float32)) / 2.0, 0.0, 1.0)
    ones = jax.random.binomial(key, jnp.float32(shots), p1, dtype=jnp.float32)
    return (1.0 - 2.0 * ones / shots).astype(z.dtype)


def straight_through(z: jax.Array, z_hat: jax.Array) -> jax.Array:
    """``z_hat`` forward, the gradient of ``z`` backward."""
    return z + jax.lax.stop_gradient(z_hat - z)


def parameter_shift(forward: Forward) -> Forward:
    """``forward`` with a VJP from the two-term shift rule, every shifted circuit re-drawn.

    ``forward(x (B, n), theta, key)`` must be a sampled (or exact) estimate of <Z>; the shifted
    circuits run one shift at a time (``lax.map``), so memory stays that of one evaluation.
    """

    @jax.custom_vjp
    def run(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        return forward(x, theta, key)

    def run_fwd(x, theta, key):
        return run(x, theta, key), (x, theta, key)

    def run_bwd(res, g):
        x, theta, key = res
        n = x.shape[-1]
        kx, kt = jax.random.split(jax.random.fold_in(key, 0x5157))
        eye_x = jnp.eye(n, dtype=x.dtype)

        def dz_dx(i):  # (B, n_out): the shift rule on input angle i of every row
            e = eye_x[i]
            k1, k2 = jax.random.split(jax.random.fold_in(kx, i))
            return (forward(x + SHIFT * e, theta, k1) - forward(x - SHIFT * e, theta, k2)) / 2

        jx = jax.lax.map(dz_dx, jnp.arange(n))  # (n_in, B, n_out)
        gx = jnp.einsum("ibo,bo->bi", jx, g.astype(jx.dtype))
        flat = theta.reshape(-1)
        eye_t = jnp.eye(flat.shape[0], dtype=theta.dtype)

        def dz_dtheta(p):  # (B, n_out)
            e = eye_t[p]
            k1, k2 = jax.random.split(jax.random.fold_in(kt, p))
            plus = forward(x, (flat + SHIFT * e).reshape(theta.shape), k1)
            minus = forward(x, (flat - SHIFT * e).reshape(theta.shape), k2)
            return (plus - minus) / 2

        jt = jax.lax.map(dz_dtheta, jnp.arange(flat.shape[0]))  # (P, B, n_out)
        gt = jnp.einsum("pbo,bo->p", jt, g.astype(jt.dtype)).reshape(theta.shape)
        return gx.astype(x.dtype), gt.astype(theta.dtype), None

    run.defvjp(run_fwd, run_bwd)
    return run
