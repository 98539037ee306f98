"""Classification heads on top of pooled backbone features; both output logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qtl.config import HeadConfig, HeadName, Simulator
from qtl.quantum.circuit import CircuitSpec, init_theta, pennylane_circuit
from qtl.quantum.noise import noisy_circuit


class CDLHead(nnx.Module):
    """Classical dense layer: Linear(features -> n) (sigmoid lives in the loss)."""

    def __init__(self, in_features: int, n_labels: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_features, n_labels, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc(features)


class DQCHead(nnx.Module):
    """Dressed quantum circuit: Linear -> tanh*pi/2 -> circuit <Z> -> Linear; a qubit per label."""

    def __init__(self, in_features: int, n_labels: int, cfg: HeadConfig, *, rngs: nnx.Rngs):
        spec = circuit_spec(cfg, n_labels)
        self.pre = nnx.Linear(in_features, n_labels, rngs=rngs)
        key = rngs.params()
        self.theta = nnx.Param(init_theta(key, spec.theta_shape, str(cfg.theta_init)))
        self.post = nnx.Linear(n_labels, n_labels, rngs=rngs)
        self.circuit = make_circuit(cfg, n_labels)
        # shots / noise (head.shots, head.noise): keys from a stream of the seed-drawn key
        self.noisy = noisy_circuit(spec, self.circuit, cfg)
        if self.noisy is not None:
            self.noise_rngs = nnx.Rngs(noise=jax.random.fold_in(key, 0x6E6F))

    def angles(self, features: jax.Array) -> jax.Array:
        """Encoding angles in (-pi/2, pi/2)."""
        return jnp.tanh(self.pre(features)) * (jnp.pi / 2)

    def __call__(self, features: jax.Array) -> jax.Array:
        if self.noisy is not None:
            z = self.noisy(self.angles(features), self.theta[...], self.noise_rngs.noise())
        else:
            z = self.circuit(self.angles(features), self.theta[...])
        return self.post(z)


def circuit_spec(cfg: HeadConfig, n_qubits: int) -> CircuitSpec:
    """The circuit family member the head config names (one qubit per label)."""
    return CircuitSpec(n_qubits, cfg.depth, str(cfg.entangler), str(cfg.rotation))


def make_circuit(cfg: HeadConfig, n_qubits: int):
    """``f(angles (B, n), theta) -> <Z> (B, n)`` from the chosen simulator."""
    spec = circuit_spec(cfg, n_qubits)
    if cfg.simulator == Simulator.pennylane:
        return pennylane_circuit(spec)
    if cfg.simulator == Simulator.fast:
        from qtl.quantum.fast import fast_circuit

        return fast_circuit(spec, max_state_mb=cfg.max_state_mb, native=cfg.native_kernel)
    raise ValueError(f"head.simulator={cfg.simulator!r} is not one of: pennylane, fast")


def make_head(cfg: HeadConfig, in_features: int, n_labels: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the head named by ``cfg.name``."""
    if cfg.name == HeadName.cdl:
        return CDLHead(in_features, n_labels, rngs=rngs)
    if cfg.name == HeadName.dqc:
        return DQCHead(in_features, n_labels, cfg, rngs=rngs)
    raise ValueError(f"head.name={cfg.name!r} is not one of: cdl, dqc")
