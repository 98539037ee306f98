"""The QViT's quantum layer: d features in, d <Z> values out, one qubit per feature.

Every feature is an RX angle as it is (no scaling), L variational layers (RX on every wire,
then a CNOT ring j -> j+1 mod d, a single CNOT on two wires), <Z_j> per wire; weights (L, d),
Xavier-normal (after Comajoan Cara et al.'s public QViT code). Encoding, rotation,
entangler and init are options. The layer takes any (..., d) input and runs the whole stack of
leading axes (images x tokens) through the circuit as one (B*T, d) batch inside the caller's
jit; ``simulator=pennylane`` is the reference, ``fast`` the simulator compiled from the same
tape (:mod:`qtl.quantum.fast`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from qtl.config import CircuitConfig as _C
from qtl.config import ConfigError, DeviceConfig, NoiseConfig
from qtl.quantum.circuit import (
    ALL_ENTANGLERS,
    ENCODINGS,
    ROTATIONS,
    CircuitSpec,
    pennylane_circuit,
)

SIMULATORS = ("fast", "pennylane")
INITS = ("xavier_normal", "normal_2pi", "uniform_2pi")


@dataclass
class QuantumLayerConfig:
    """One circuit family for every quantum projection of a QViT."""

    # the defaults are the schema's (qtl.config.CircuitConfig, where each is documented)
    layers: int = _C.layers
    encoding: str = _C.encoding
    rotation: str = _C.rotation
    entangler: str = _C.entangler
    init: str = _C.init
    simulator: str = _C.simulator.value
    max_state_mb: float | None = _C.max_state_mb
    native_kernel: bool = _C.native_kernel
    shots: int | None = _C.shots
    gradient: str = _C.gradient.value
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # channels, as trajectories
    device: DeviceConfig = field(default_factory=DeviceConfig)  # a PennyLane device runs it


def validate_quantum(cfg: QuantumLayerConfig, where: str = "model.circuit") -> None:
    """Errors naming the field, at build time (the config schema may not run __post_init__)."""
    checks = (
        ("encoding", ENCODINGS),
        ("rotation", ROTATIONS),
        ("entangler", ALL_ENTANGLERS),
        ("init", INITS),
        ("simulator", SIMULATORS),
    )
    for name, allowed in checks:
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"{where}.{name}='{value}' is not one of: {', '.join(allowed)}")
    if cfg.layers < 1:
        raise ConfigError(f"{where}.layers={cfg.layers}, expected >= 1")


def layer_spec(cfg: QuantumLayerConfig, wires: int) -> CircuitSpec:
    """The circuit of a ``wires``-feature quantum layer."""
    if wires < 2:
        raise ValueError(f"a quantum layer needs at least 2 features (qubits), got {wires}")
    return CircuitSpec(wires, cfg.layers, cfg.entangler, cfg.rotation, cfg.encoding)


def make_simulator(
    cfg: QuantumLayerConfig, wires: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(x (N, d), weights) -> <Z> (N, d)`` on the configured simulator."""
    validate_quantum(cfg)
    noisy = ("shots", "gradient", "noise", "device")  # noisy_circuit's, the last fields
    exact = {k: v for k, v in vars(cfg).items() if k not in noisy}
    return _simulator(tuple(exact.values()), wires)


@functools.lru_cache(maxsize=64)
def _simulator(fields: tuple, wires: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    # one compiled plan per circuit shape: a QViT has ~20 layers of the same two widths, and
    # reading the tape through PennyLane for each would cost seconds at build time
    cfg = QuantumLayerConfig(*fields)
    spec = layer_spec(cfg, wires)
    if cfg.simulator == "pennylane":
        return pennylane_circuit(spec)
    from qtl.quantum.fast import fast_circuit

    return fast_circuit(spec, max_state_mb=cfg.max_state_mb, native=cfg.native_kernel)


def init_weights(key: jax.Array, shape: tuple[int, ...], scheme: str) -> jax.Array:
    """Circuit weights (L, d[, 2]): Xavier normal over (L, d) by default."""
    if scheme == "xavier_normal":
        return jax.nn.initializers.xavier_normal(in_axis=0, out_axis=1)(key, shape, jnp.float32)
    if scheme == "normal_2pi":
        return 2 * jnp.pi * jax.random.normal(key, shape, jnp.float32)
    if scheme == "uniform_2pi":
        return jax.random.uniform(key, shape, jnp.float32, 0.0, 2 * jnp.pi)
    raise ConfigError(f"model.circuit.init='{scheme}' is not one of: {', '.join(INITS)}")


class QuantumLayer(nnx.Module):
    """(..., d) -> (..., d): every row of the leading axes through one d-qubit circuit."""

    def __init__(self, wires: int, cfg: QuantumLayerConfig, *, rngs: nnx.Rngs):
        self.spec = layer_spec(cfg, wires)
        self.wires = wires
        key = rngs.params()
        self.weights = nnx.Param(init_weights(key, self.spec.theta_shape, cfg.init))
        self.circuit = make_simulator(cfg, wires)
        from qtl.quantum.noise import noisy_circuit

        # shots / noise: a key stream of its own, from this layer's seed-drawn key
        self.noisy = noisy_circuit(self.spec, self.circuit, cfg)
        if self.noisy is not None:
            self.noise_rngs = nnx.Rngs(noise=jax.random.fold_in(key, 0x6E6F))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.wires:
            raise ValueError(f"quantum layer: {x.shape[-1]} features in, built for {self.wires}")
        lead = x.shape[:-1]
        if self.noisy is not None:
            key = self.noise_rngs.noise()
            z = self.noisy(x.reshape(-1, self.wires), self.weights[...], key)
        else:
            z = self.circuit(x.reshape(-1, self.wires), self.weights[...])
        return z.reshape(*lead, self.wires)
