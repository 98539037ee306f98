"""Density-matrix references for qtl's noisy circuits: PennyLane ``default.mixed`` with the same
channels placed gate by gate, and qiskit-aer's density-matrix method on a fake backend."""

from __future__ import annotations

import itertools

import numpy as np
import pennylane as qml

from qtl.quantum.circuit import CircuitSpec, Symbol, circuit_gates
from qtl.quantum.noise.channels import NoiseParams

_P = [np.eye(2), qml.matrix(qml.PauliX(0)), qml.matrix(qml.PauliY(0)), qml.matrix(qml.PauliZ(0))]


def _two_qubit_depolarizing(p: float) -> list[np.ndarray]:
    kraus = [np.sqrt(1 - p) * np.eye(4)]
    for a, b in itertools.product(range(4), repeat=2):
        if (a, b) != (0, 0):
            kraus.append(np.sqrt(p / 15) * np.kron(_P[a], _P[b]))
    return kraus


def _value(sym, x: np.ndarray, theta: np.ndarray) -> float:
    return float(x[sym.index[0]] if sym.array == "x" else theta[sym.index])


def mixed_z(spec: CircuitSpec, params: NoiseParams, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact noisy <Z_i> (float64) of one example on ``default.mixed``."""
    ops = list(circuit_gates(spec))
    n = spec.n_qubits
    cnot_ad, cnot_pd = params.cnot_damping()
    dev = qml.device("default.mixed", wires=n)

    def damp(w, ad, pd):
        if ad > 0:
            qml.AmplitudeDamping(ad, wires=w)
        if pd > 0:
            qml.PhaseDamping(pd, wires=w)

    @qml.qnode(dev)
    def circuit():
        for op in ops:
            reps = params.pulses.get(op.name, 1)
            wires = op.wires
            if op.name == "CNOT":
                qml.CNOT(wires=wires)
                for _ in range(reps):
                    p2 = params.pair(*wires)
                    if p2 > 0:
                        qml.QubitChannel(_two_qubit_depolarizing(p2), wires=wires)
                    for w in wires:
                        damp(w, cnot_ad[w], cnot_pd[w])
                continue
            p = op.param
            w = wires[0]
            if isinstance(p, Symbol):
                getattr(qml, op.name)(_value(p, x, theta), wires=w)
            else:
                getattr(qml, op.name)(wires=w)
            for _ in range(reps):
                if params.depolarizing[w] > 0:
                    qml.DepolarizingChannel(params.depolarizing[w], wires=w)
                damp(w, params.amplitude_damping[w], params.phase_damping[w])
        for w in range(n):  # symmetric readout error = a bit flip just before measuring
            if params.readout_01[w] > 0:
                qml.BitFlip(params.readout_01[w], wires=w)
        return [qml.expval(qml.PauliZ(w)) for w in range(n)]

    return np.array(circuit(), dtype=np.float64)


def aer_z(spec: CircuitSpec, backend_name: str, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact <Z_i> on qiskit-aer's density matrix with ``NoiseModel.from_backend`` (gate noise
    only: a saved density matrix is before measurement, so readout is not in it)."""
    from qiskit import QuantumCircuit, transpile
    from qiskit_aer import AerSimulator
    from qiskit_aer.noise import NoiseModel

    from qtl.quantum.noise.device_models import _backend

    backend = _backend(backend_name)
    n = spec.n_qubits
    qc = QuantumCircuit(n)
    for op in circuit_gates(spec):
        w = op.wires
        if op.name == "CNOT":
            qc.cx(*w)
        elif op.name == "Hadamard":
            qc.h(w[0])
        else:
            p = op.param
            getattr(qc, op.name.lower())(_value(p, x, theta), w[0])
    compiled = transpile(
        qc, backend, initial_layout=list(range(n)), optimization_level=0, seed_transpiler=0
    )
    compiled.save_density_matrix()
    sim = AerSimulator(method="density_matrix", noise_model=NoiseModel.from_backend(backend))
    rho = np.asarray(sim.run(compiled).result().data()["density_matrix"])
    probs = np.real(np.diag(rho))
    index = np.arange(probs.shape[0])
    return np.array([probs @ (1 - 2 * ((index >> q) & 1)) for q in range(n)])
