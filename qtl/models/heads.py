"""Classification heads on top of pooled backbone features; both output logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qtl.config import HeadConfig, HeadName, Simulator
from qtl.quantum.circuit import init_theta, pennylane_circuit


class CDLHead(nnx.Module):
    """Classical dense layer: Linear(features -> n) (sigmoid lives in the loss)."""

    def __init__(self, in_features: int, n_labels: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(in_features, n_labels, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc(features)


class DQCHead(nnx.Module):
    """Dressed quantum circuit: Linear -> tanh*pi/2 -> circuit <Z> -> Linear; a qubit per label."""

    def __init__(self, in_features: int, n_labels: int, cfg: HeadConfig, *, rngs: nnx.Rngs):
        self.pre = nnx.Linear(in_features, n_labels, rngs=rngs)
        self.theta = nnx.Param(
            init_theta(
                rngs.params(), cfg.depth, n_labels, getattr(cfg.theta_init, "value", cfg.theta_init)
            )
        )
        self.post = nnx.Linear(n_labels, n_labels, rngs=rngs)
        self.circuit = make_circuit(cfg.simulator, n_labels)

    def angles(self, features: jax.Array) -> jax.Array:
        """Encoding angles in (-pi/2, pi/2)."""
        return jnp.tanh(self.pre(features)) * (jnp.pi / 2)

    def __call__(self, features: jax.Array) -> jax.Array:
        z = self.circuit(self.angles(features), self.theta[...])
        return self.post(z)


def make_circuit(simulator: Simulator, n_qubits: int):
    """``f(angles (B, n), theta (depth, n)) -> <Z> (B, n)`` from the chosen simulator."""
    if simulator == Simulator.pennylane:
        return pennylane_circuit(n_qubits)
    if simulator == Simulator.fast:
        from qtl.quantum.fast import fast_circuit

        return fast_circuit(n_qubits)
    raise ValueError(f"head.simulator={simulator!r} is not one of: pennylane, fast")


def make_head(cfg: HeadConfig, in_features: int, n_labels: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the head named by ``cfg.name``."""
    if cfg.name == HeadName.cdl:
        return CDLHead(in_features, n_labels, rngs=rngs)
    if cfg.name == HeadName.dqc:
        return DQCHead(in_features, n_labels, cfg, rngs=rngs)
    raise ValueError(f"head.name={cfg.name!r} is not one of: cdl, dqc")
