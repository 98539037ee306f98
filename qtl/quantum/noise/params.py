"""A circuit's per-qubit channels from its ``noise`` options (one place for the simulator's
trajectories and for PennyLane devices, which both read it)."""

from __future__ import annotations

from typing import Any

from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.noise.channels import NoiseParams, combine, uniform


def noise_params(spec: CircuitSpec, noise: Any) -> NoiseParams:
    """The per-qubit channels of ``noise`` (a NoiseConfig): a device model plus explicit ones."""
    explicit = uniform(spec.n_qubits, noise)
    if noise.device_model is None:
        return explicit
    from qtl.quantum.noise.device_models import device_params

    return combine(device_params(noise.device_model, spec.n_qubits), explicit)
