"""The whole-circuit native kernel (qtl/quantum/kernels/statevector.cc): outputs and every
gradient of real circuits in float32, against the float64 XLA path that tests/test_fast_sim.py
pins to PennyLane; the plans it takes and the ones it leaves to the per-layer path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl.quantum import kernels
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.fast import _state_kernel_fits, compile_plan, fast_circuit

pytestmark = pytest.mark.skipif(
    kernels.statevector_targets() is None, reason="no C++ compiler: the XLA path is tested"
)


def _case(spec: CircuitSpec, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-np.pi, np.pi, size=(batch, spec.n_qubits))
    theta = rng.normal(0.0, 2 * np.pi, size=spec.theta_shape)
    weights = rng.normal(size=(batch, spec.n_qubits))
    return x, theta, weights


def _value_and_grads(spec, x, theta, weights, dtype, native):
    f = fast_circuit(spec, native=native)

    def loss(x, theta):
        return jnp.sum(jnp.asarray(weights, dtype) * f(x, theta) ** 2) + jnp.sum(f(x, theta))

    args = (jnp.asarray(x, dtype), jnp.asarray(theta, dtype))
    z = jax.jit(f)(*args)
    value, (gx, gtheta) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
    return [np.asarray(a, np.float64) for a in (z, value, gx, gtheta)]


@pytest.mark.parametrize(
    "n, depth, entangler, encoding, batch",
    [
        (4, 2, "ring", "h_ry", 3),  # one row of 16 floats
        (5, 3, "chain", "ry", 1),
        (7, 4, "even_odd", "h_ry", 5),
        (11, 2, "ring", "h_ry", 4),  # the whole state is one row
        (12, 3, "ring", "h_ry", 3),  # one high bit: tile passes of one pair
        (14, 3, "even_odd", "ry", 2),
        (16, 2, "chain", "h_ry", 3),
        (20, 2, "ring", "h_ry", 2),  # two tile passes: Grams taken before U^T changes lam
    ],
)
def test_whole_circuit_kernel_matches_float64(n, depth, entangler, encoding, batch):
    spec = CircuitSpec(n, depth, entangler, "ry", encoding)
    assert _state_kernel_fits(compile_plan(spec))
    x, theta, weights = _case(spec, batch, n + depth)
    got = _value_and_grads(spec, x, theta, weights, jnp.float32, True)
    with jax.enable_x64(True):
        want = _value_and_grads(spec, x, theta, weights, jnp.float64, True)
    for name, a, b in zip(("z", "loss", "d/dx", "d/dtheta"), got, want, strict=True):
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=0, err_msg=name)


def test_kernel_equals_the_per_layer_path_on_the_dqc_circuit():
    """The study's circuit at 13 qubits, batch 6: the kernel and the per-layer XLA path (with
    and without the Gram kernel) agree to float32 rounding."""
    spec = CircuitSpec(13, 3)
    x, theta, weights = _case(spec, 6, 0)
    results = [
        _value_and_grads(spec, x, theta, weights, jnp.float32, mode)
        for mode in (True, "gram", False)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(a, b, atol=3e-6 * max(1.0, np.max(np.abs(b))))


def test_kernel_under_vmap_and_with_one_example():
    spec = CircuitSpec(9, 3)
    x, theta, _ = _case(spec, 4, 1)
    thetas = np.stack([theta, theta * 0.5, theta + 1.0]).astype(np.float32)
    x = x.astype(np.float32)

    def grads(native):
        f = fast_circuit(spec, native=native)
        return jax.jit(jax.vmap(jax.grad(lambda t: jnp.sum(f(x, t) ** 2))))(thetas)

    np.testing.assert_allclose(grads(True), grads(False), atol=3e-6)
    single = fast_circuit(spec)(jnp.asarray(x[0]), jnp.asarray(theta, jnp.float32))
    assert single.shape == (9,)
    np.testing.assert_allclose(single, fast_circuit(spec, native=False)(x, theta)[0], atol=2e-6)


@pytest.mark.parametrize(
    "spec, fits",
    [
        (CircuitSpec(8, 3), True),
        (CircuitSpec(8, 3, encoding="ry"), True),
        (CircuitSpec(8, 1), False),  # all product state: no state vector at all
        (CircuitSpec(3, 3), False),  # fewer wires than a 16-float vector
        (CircuitSpec(8, 3, rotation="rx"), False),  # complex amplitudes
        (CircuitSpec(8, 3, encoding="rx"), False),
    ],
)
def test_which_plans_the_kernel_takes(spec, fits):
    assert _state_kernel_fits(compile_plan(spec)) is fits


def test_bad_shapes_are_a_clear_error():
    forward, _ = kernels.statevector_targets()
    call = jax.ffi.ffi_call(forward, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    vec = jnp.ones((2, 3, 2), jnp.float32)  # 3 wires: fewer than a 16-float vector holds
    mats = jnp.ones((1, 3, 2, 2), jnp.float32)
    nets = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(Exception, match="4 <= n <= 30"):
        jax.block_until_ready(call(vec, mats, nets))
    with pytest.raises(Exception, match="nets \\(m \\+ 1, n\\)"):
        jax.block_until_ready(call(jnp.ones((2, 5, 2)), jnp.ones((1, 5, 2, 2)), nets))


def test_unknown_native_mode_is_refused():
    with pytest.raises(ValueError, match="native='fast' is not one of"):
        fast_circuit(CircuitSpec(4, 2), native="fast")
