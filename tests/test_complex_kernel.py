"""The complex-circuit native kernel (qtl/quantum/kernels/complex_circuit.cc, the QViT's
circuits): outputs and every gradient in float32 against the float64 XLA path that
tests/test_fast_sim.py pins to PennyLane; the plans it takes; that the compiled program runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl.quantum import kernels
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.fast import _complex_kernel_fits, compile_plan, fast_circuit

pytestmark = pytest.mark.skipif(
    kernels.complex_targets() is None, reason="no C++ compiler: the XLA path is tested"
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
    "n, depth, entangler, rotation, encoding, batch",
    [
        (2, 2, "qvit_ring", "rx", "rx", 3),  # one CNOT; fewer rows than a group of 8
        (4, 4, "qvit_ring", "rx", "rx", 11),  # the QViT's MLP circuit; a partial second group
        (8, 2, "qvit_ring", "rx", "rx", 17),  # the QViT's attention circuit
        (5, 3, "ring", "rz_ry", "h_ry", 8),  # RZ and RY, Hadamards in the prefix
        (7, 3, "even_odd", "rx", "ry", 5),
        (6, 2, "ring", "ry", "rx", 9),  # real rotation matrices on a complex state
        (11, 2, "chain", "rx", "rx", 2),  # odd split of the product state (5 + 6 wires)
    ],
)
def test_complex_kernel_matches_float64(n, depth, entangler, rotation, encoding, batch):
    spec = CircuitSpec(n, depth, entangler, rotation, encoding)
    assert _complex_kernel_fits(compile_plan(spec))
    x, theta, weights = _case(spec, batch, n + depth)
    got = _value_and_grads(spec, x, theta, weights, jnp.float32, True)
    with jax.enable_x64(True):
        want = _value_and_grads(spec, x, theta, weights, jnp.float64, False)
    for name, a, b in zip(("z", "loss", "d/dx", "d/dtheta"), got, want, strict=True):
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=0, err_msg=name)


def test_the_compiled_step_runs_the_kernel_and_vmap_agrees():
    spec = CircuitSpec(6, 2, "qvit_ring", "rx", "rx")
    x, theta, _ = _case(spec, 4, 0)
    x = jnp.asarray(x, jnp.float32)
    f = fast_circuit(spec)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(f(x, t) ** 2)))
    hlo = grad.lower(jnp.asarray(theta, jnp.float32)).as_text()
    assert "qtl_complex_forward" in hlo and "qtl_complex_backward" in hlo
    thetas = jnp.asarray(np.stack([theta, theta * 0.5]), jnp.float32)
    xla = fast_circuit(spec, native=False)
    batched = jax.vmap(jax.grad(lambda t: jnp.sum(f(x, t) ** 2)))(thetas)
    want = jax.vmap(jax.grad(lambda t: jnp.sum(xla(x, t) ** 2)))(thetas)
    np.testing.assert_allclose(batched, want, atol=3e-5)


@pytest.mark.parametrize(
    "spec, fits",
    [
        (CircuitSpec(8, 2, "qvit_ring", "rx", "rx"), True),
        (CircuitSpec(8, 1, "qvit_ring", "rx", "rx"), False),  # a product state: no state
        (CircuitSpec(8, 3), False),  # real amplitudes: statevector.cc's
        (CircuitSpec(21, 2, "ring", "rx", "rx"), False),  # past the kernel's 20 qubits
    ],
)
def test_which_plans_the_complex_kernel_takes(spec, fits):
    assert _complex_kernel_fits(compile_plan(spec)) is fits


def test_bad_shapes_are_a_clear_error():
    forward, _ = kernels.complex_targets()
    call = jax.ffi.ffi_call(forward, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    nets = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(Exception, match="vec \\(B, n, 2, 2\\)"):
        jax.block_until_ready(call(jnp.ones((2, 3, 2)), jnp.ones((1, 3, 2, 2, 2)), nets))


def test_rx_layers_take_the_angles_gradient_and_others_the_entries():
    """Which backward a circuit gets: RX layers (the QViT's) their angles' gradient, any other
    rotation the 2x2 entries' (tests/test_kernel_isa.py checks the two agree)."""
    from qtl.quantum.fast import _rx_only

    def layers(spec):
        return [gates for kind, gates in compile_plan(spec).steps if kind == "local"]

    assert _rx_only(layers(CircuitSpec(8, 2, "qvit_ring", "rx", "rx")), 8)
    assert _rx_only(layers(CircuitSpec(7, 3, "even_odd", "rx", "ry")), 7)
    assert not _rx_only(layers(CircuitSpec(6, 2, "ring", "ry", "rx")), 6)
    assert not _rx_only(layers(CircuitSpec(5, 3, "ring", "rz_ry", "h_ry")), 5)
