"""The noise channels qtl simulates, as per-qubit probabilities attached to the circuit's gates.

After every gate, on the wires it acts on, in this order: depolarizing (one-qubit gates:
X, Y, Z each with p/3, PennyLane's ``DepolarizingChannel``; CNOTs: each of the 15 non-identity
two-qubit Paulis with p2/15), amplitude damping (Kraus [[1,0],[0,sqrt(1-g)]], [[0,sqrt g],[0,0]],
PennyLane's ``AmplitudeDamping``), phase damping (PennyLane's ``PhaseDamping``; the same channel
as a Z flip with probability (1 - sqrt(1-g))/2). ``pulses`` repeats a gate's channels (a device
model applies its basis gate's error once per physical pulse). Readout: a bit flip of the
measured bit, P(read 1 | 0) and P(read 0 | 1) per qubit, applied to <Z> exactly:
<Z>' = (1 - a - b) <Z> + (b - a).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NoiseParams:
    """Per-qubit channel strengths of one circuit (numpy, baked into the compiled program)."""

    n_qubits: int
    depolarizing: np.ndarray  # (n,) after each one-qubit gate on that wire
    amplitude_damping: np.ndarray  # (n,) gamma per gate on that wire
    phase_damping: np.ndarray  # (n,) gamma per gate on that wire
    readout_01: np.ndarray  # (n,) P(read 1 | state 0)
    readout_10: np.ndarray  # (n,) P(read 0 | state 1)
    depolarizing_2q: float = 0.0  # after each CNOT whose pair is not in ``pair_depolarizing``
    pair_depolarizing: dict[tuple[int, int], float] = field(default_factory=dict)
    # the channels of a CNOT's wires (a device's 2q gate lasts longer than its 1q gates)
    cnot_amplitude_damping: np.ndarray | None = None
    cnot_phase_damping: np.ndarray | None = None
    pulses: dict[str, int] = field(default_factory=dict)  # gate name -> error repetitions
    source: dict[str, Any] = field(default_factory=dict)  # what a run records (device, date)

    @property
    def gate_noise(self) -> bool:
        """Whether any channel acts between gates (then trajectories are needed)."""
        cnot = [self.cnot_amplitude_damping, self.cnot_phase_damping]
        return bool(
            self.depolarizing.any()
            or self.amplitude_damping.any()
            or self.phase_damping.any()
            or self.depolarizing_2q > 0
            or any(p > 0 for p in self.pair_depolarizing.values())
            or any(c is not None and c.any() for c in cnot)
        )

    @property
    def readout(self) -> bool:
        return bool(self.readout_01.any() or self.readout_10.any())

    def pair(self, control: int, target: int) -> float:
        """The two-qubit depolarizing probability of a CNOT on this pair."""
        return self.pair_depolarizing.get((control, target), self.depolarizing_2q)

    def cnot_damping(self) -> tuple[np.ndarray, np.ndarray]:
        ad, pd = self.cnot_amplitude_damping, self.cnot_phase_damping
        ad = self.amplitude_damping if ad is None else ad
        pd = self.phase_damping if pd is None else pd
        return ad, pd


def uniform(n_qubits: int, noise: Any) -> NoiseParams:
    """The same channels on every wire, from a ``NoiseConfig``."""
    full = np.full
    p2 = noise.depolarizing if noise.depolarizing_2q is None else noise.depolarizing_2q
    return NoiseParams(
        n_qubits,
        depolarizing=full(n_qubits, float(noise.depolarizing)),
        amplitude_damping=full(n_qubits, float(noise.amplitude_damping)),
        phase_damping=full(n_qubits, float(noise.phase_damping)),
        readout_01=full(n_qubits, float(noise.readout)),
        readout_10=full(n_qubits, float(noise.readout)),
        depolarizing_2q=float(p2),
    )


def combine(a: NoiseParams, b: NoiseParams) -> NoiseParams:
    """A device model plus explicit channels: ``b``'s strengths added to ``a``'s (first order)."""
    ad_a, pd_a = a.cnot_damping()
    ad_b, pd_b = b.cnot_damping()
    return NoiseParams(
        a.n_qubits,
        depolarizing=np.clip(a.depolarizing + b.depolarizing, 0, 1),
        amplitude_damping=np.clip(a.amplitude_damping + b.amplitude_damping, 0, 1),
        phase_damping=np.clip(a.phase_damping + b.phase_damping, 0, 1),
        readout_01=np.clip(a.readout_01 + b.readout_01, 0, 1),
        readout_10=np.clip(a.readout_10 + b.readout_10, 0, 1),
        depolarizing_2q=min(1.0, a.depolarizing_2q + b.depolarizing_2q),
        pair_depolarizing={
            k: min(1.0, v + b.depolarizing_2q) for k, v in a.pair_depolarizing.items()
        },
        cnot_amplitude_damping=np.clip(ad_a + ad_b, 0, 1),
        cnot_phase_damping=np.clip(pd_a + pd_b, 0, 1),
        pulses=dict(a.pulses),
        source=dict(a.source),
    )


def phase_flip_probability(gamma: np.ndarray | float) -> np.ndarray:
    """Phase damping gamma as a Z flip probability: off-diagonals scale by sqrt(1 - gamma)."""
    return (1.0 - np.sqrt(1.0 - np.asarray(gamma, dtype=np.float64))) / 2.0


def apply_readout(z: Any, params: NoiseParams) -> Any:
    """<Z> as read through each qubit's bit-flip readout error (exact in expectation)."""
    a = params.readout_01.astype(np.float32)
    b = params.readout_10.astype(np.float32)
    return (1.0 - a - b) * z + (b - a)
