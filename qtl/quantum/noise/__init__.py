"""Shots and noise on the circuits of both studies (docs/noise.md).

:func:`noisy_circuit` turns a circuit's options (``shots``, ``gradient``, ``noise``: the same
fields under ``head.`` and ``model.circuit.``) into ``f(x, theta, key) -> <Z>^``, or ``None``
when they ask for nothing but exact expectation values (then the exact simulator runs, bit for
bit as without these options). Gate noise runs as trajectories
(:mod:`qtl.quantum.noise.trajectories`); without it, the exact simulator's <Z> is read through
the readout error and sampled (:mod:`qtl.quantum.shots`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.noise.channels import apply_readout
from qtl.quantum.noise.params import noise_params
from qtl.quantum.shots import parameter_shift, sample_z, straight_through

Noisy = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def is_active(opts: Any) -> bool:
    """Whether the options ask for anything but exact expectation values."""
    noise = opts.noise
    channels = (
        noise.depolarizing,
        noise.depolarizing_2q or 0.0,
        noise.amplitude_damping,
        noise.phase_damping,
        noise.readout,
    )
    device = getattr(opts, "device", None)
    if device is not None and device.name is not None:  # a PennyLane device, not qtl's simulator
        return True
    return opts.shots is not None or any(c > 0 for c in channels) or noise.device_model is not None


def noisy_circuit(
    spec: CircuitSpec, exact: Callable[[jax.Array, jax.Array], jax.Array], opts: Any
) -> Noisy | None:
    """``f(x (B, n), theta, key) -> (B, n)`` under ``opts``' shots and noise; None if exact.

    ``exact``: the configured simulator (used when no channel acts between gates).
    """
    if getattr(opts, "device", None) is not None and opts.device.name is not None:
        from qtl.quantum.device import device_circuit  # the device samples and adds the noise

        return device_circuit(spec, opts, "model.circuit" if hasattr(opts, "layers") else "head")
    if not is_active(opts):
        return None
    params = noise_params(spec, opts.noise)
    shots = opts.shots
    if params.gate_noise:  # Pauli channels on the exact kernel where it runs, else gate by gate
        from qtl.quantum.noise.pauli_frame import pauli_frame_circuit
        from qtl.quantum.noise.trajectories import trajectory_circuit

        k = opts.noise.trajectories
        mean = pauli_frame_circuit(spec, params, k) or trajectory_circuit(spec, params, k)
    else:

        def mean(x, theta, key):
            del key
            z = exact(x, theta)
            return apply_readout(z, params).astype(z.dtype) if params.readout else z

    def forward(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        k_traj, k_shots = jax.random.split(key)
        z = mean(x, theta, k_traj)
        return z if shots is None else sample_z(z, shots, k_shots)

    if str(getattr(opts.gradient, "value", opts.gradient)) == "parameter_shift":
        return parameter_shift(forward)
    if shots is None:
        return forward

    def adjoint(x: jax.Array, theta: jax.Array, key: jax.Array) -> jax.Array:
        k_traj, k_shots = jax.random.split(key)
        z = mean(x, theta, k_traj)
        return straight_through(z, sample_z(jax.lax.stop_gradient(z), shots, k_shots))

    return adjoint


def describe(spec: CircuitSpec, opts: Any) -> dict[str, Any]:
    """What a run records about its circuit's shots and noise (results.json)."""
    noise = opts.noise
    out: dict[str, Any] = {
        "shots": opts.shots,
        "gradient": str(getattr(opts.gradient, "value", opts.gradient)),
        "trajectories": noise.trajectories,
        "channels": {
            "depolarizing": noise.depolarizing,
            "depolarizing_2q": noise.depolarizing
            if noise.depolarizing_2q is None
            else noise.depolarizing_2q,
            "amplitude_damping": noise.amplitude_damping,
            "phase_damping": noise.phase_damping,
            "readout": noise.readout,
        },
        "device_model": noise.device_model,
        "exact": not is_active(opts),
    }
    if noise.device_model is not None:
        out["calibration"] = noise_params(spec, noise).source
    if getattr(opts, "device", None) is not None and opts.device.name is not None:
        from qtl.quantum.device import runner

        out["device"] = runner(spec, opts).record()  # name, options, plugin; absent = qtl's
    return out
