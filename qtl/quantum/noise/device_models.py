"""Device noise from real calibration data: IBM's offline snapshots, mapped onto qtl's gates.

``noise.device_model=fake_manila`` (any backend of ``qiskit_ibm_runtime.fake_provider``, by its
``backend.name``) reads the snapshot's T1, T2, gate errors and durations, and readout errors,
and builds the channels qiskit-aer's ``NoiseModel.from_backend`` builds for it, on qtl's gates:

- wire i is physical qubit i (trivial layout); connectivity is ignored: a CNOT on an uncoupled
  pair gets the mean two-qubit gate error and duration of the coupling map (routing it would
  add SWAPs, three CNOTs each);
- a one-qubit gate costs what its transpilation to IBM's basis costs: H one ``sx`` pulse, RX
  and RY two, RZ none (virtual); each pulse brings the ``sx`` error of that qubit. The channels
  of both pulses follow the gate (on the device the second pulse comes after an RZ: an O(gamma)
  difference in where the damping acts);
- each pulse (and each CNOT, from the ``cx`` or ``ecr`` entry) is aer's error: depolarizing
  composed with thermal relaxation. Thermal relaxation over the gate's duration t is amplitude
  damping gamma = 1 - exp(-t/T1) then phase damping 1 - exp(t/T1 - 2t/T2) (the same channel:
  z relaxes with exp(-t/T1), x and y with exp(-t/T2); T2 is capped at 2 T1); the depolarizing
  part is aer's: what the calibrated error leaves after relaxation's infidelity,
  depol = d (e - r) / (d (1 - r) - 1), which is a Pauli channel with 1 - 1/d^2 of it on the
  non-identity Paulis;
- readout: the snapshot's measurement error as a symmetric bit flip (what aer uses);
- idle qubits get no noise (aer's ``from_backend`` adds none either), nor crosstalk or leakage.

The snapshots are years old: a run records the backend's name and the snapshot's date.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import numpy as np

from qtl.config import ConfigError
from qtl.quantum.noise.channels import NoiseParams

EXTRA = "pip install -e '.[noise]' (qiskit, qiskit-aer, qiskit-ibm-runtime)"
PULSES = {"Hadamard": 1, "RX": 2, "RY": 2, "RZ": 0}  # sx pulses per qtl gate on IBM's basis


def _fake_provider() -> Any:
    # qiskit logs every transpiler pass at INFO, and a run's log is at INFO
    logging.getLogger("qiskit").setLevel(logging.WARNING)
    try:
        from qiskit_ibm_runtime import fake_provider
    except ImportError as err:
        raise ConfigError(
            f"noise.device_model needs the 'noise' extra, which is not installed ({err.name}): "
            f"{EXTRA}"
        ) from err
    return fake_provider


@functools.cache
def device_names() -> dict[str, str]:
    """Accepted names (``fake_<device>``) -> the fake provider's class name."""
    fp = _fake_provider()
    out: dict[str, str] = {}
    for cls in sorted(dir(fp)):
        if not cls.startswith("Fake") or cls.startswith("FakeProvider"):
            continue
        obj = getattr(fp, cls)
        if not isinstance(obj, type) or not hasattr(obj, "num_qubits"):
            continue
        base = cls[4:]
        base = base[:-2] if base.endswith("V2") else base
        name = "fake_" + "".join(("_" + c.lower()) if c.isupper() else c for c in base).lstrip("_")
        if name not in out or cls.endswith("V2"):  # prefer the BackendV2 class
            out[name] = cls
    return out


def check_device_model(name: str, where: str, n_qubits: int | None = None) -> None:
    """One-line ConfigError for an unknown backend, a missing extra or too few qubits."""
    names = device_names()
    if name not in names:
        raise ConfigError(f"{where}='{name}' is not a fake backend; one of: {', '.join(names)}")
    if n_qubits is not None:
        backend = _backend(name)
        if backend.num_qubits < n_qubits:
            raise ConfigError(
                f"{where}='{name}' has {backend.num_qubits} qubits, the circuit needs {n_qubits}; "
                "pick a larger backend (e.g. fake_montreal: 27)"
            )


@functools.cache
def _backend(name: str) -> Any:
    return getattr(_fake_provider(), device_names()[name])()


def _snapshot_date(backend: Any) -> str | None:
    path = os.path.join(getattr(backend, "dirname", ""), getattr(backend, "props_filename", ""))
    try:
        with open(path) as f:
            return json.load(f).get("last_update_date")
    except (OSError, ValueError):
        return None


def relaxation(t1: float | None, t2: float | None, time: float) -> tuple[float, float]:
    """(amplitude damping gamma, phase damping gamma) of thermal relaxation over ``time``."""
    if not time or not t1 or not np.isfinite(t1):
        return 0.0, 0.0
    t2 = min(t2 if t2 else 2 * t1, 2 * t1)
    gamma = 1.0 - np.exp(-time / t1)
    lam = 1.0 - np.exp(time / t1 - 2 * time / t2)
    return float(gamma), float(max(lam, 0.0))


def _relax_ptm_trace(gamma: float, lam: float) -> float:
    """Trace of the Pauli transfer matrix of damping then dephasing (1 + 2 e^{-t/T2} + ...)."""
    xy = np.sqrt(1 - gamma) * np.sqrt(1 - lam)
    return 1.0 + 2 * xy + (1 - gamma)


def depolarizing_share(error: float | None, ptm_trace: float, dim: int) -> float:
    """Non-identity Pauli probability of aer's depolarizing part of a gate's error."""
    if not error:
        return 0.0
    relax_fid = (ptm_trace / dim**2 * dim + 1) / (dim + 1)  # average gate fidelity
    relax_infid = 1 - relax_fid
    if error <= relax_infid:
        return 0.0
    error = min(error, dim / (dim + 1))
    depol = dim * (error - relax_infid) / (dim * relax_fid - 1)
    depol = min(depol, dim**2 / (dim**2 - 1))
    return float(depol * (1 - 1 / dim**2))


def device_params(name: str, n_qubits: int) -> NoiseParams:
    """The channels of backend ``name`` on wires 0..n-1 (see the module doc)."""
    check_device_model(name, "noise.device_model", n_qubits)
    backend = _backend(name)
    target = backend.target
    one_q = "sx" if "sx" in target.operation_names else None
    two_q = next((g for g in ("cx", "ecr", "cz") if g in target.operation_names), None)
    dep = np.zeros(n_qubits)
    ad = np.zeros(n_qubits)
    pd = np.zeros(n_qubits)
    ro = np.zeros(n_qubits)
    t1s, t2s = [], []
    for q in range(n_qubits):
        props = backend.qubit_properties(q)
        t1, t2 = getattr(props, "t1", None), getattr(props, "t2", None)
        t1s.append(t1)
        t2s.append(t2)
        inst = target[one_q].get((q,)) if one_q else None
        if inst is not None:
            ad[q], pd[q] = relaxation(t1, t2, inst.duration or 0.0)
            dep[q] = depolarizing_share(inst.error, _relax_ptm_trace(ad[q], pd[q]), 2)
        meas = target["measure"].get((q,)) if "measure" in target.operation_names else None
        ro[q] = (meas.error or 0.0) if meas is not None else 0.0
    pairs: dict[tuple[int, int], tuple[float, float]] = {}
    if two_q:
        for qargs, inst in target[two_q].items():
            if inst is not None and qargs is not None:
                pairs[tuple(qargs)] = (inst.error or 0.0, inst.duration or 0.0)
    mean_err = float(np.mean([e for e, _ in pairs.values()])) if pairs else 0.0
    mean_dur = float(np.mean([d for _, d in pairs.values()])) if pairs else 0.0
    durations = [d for (a, b), (_, d) in pairs.items() if a < n_qubits and b < n_qubits]
    cnot_time = float(np.mean(durations)) if durations else mean_dur
    cnot_ad = np.zeros(n_qubits)
    cnot_pd = np.zeros(n_qubits)
    for q in range(n_qubits):
        cnot_ad[q], cnot_pd[q] = relaxation(t1s[q], t2s[q], cnot_time)
    pair_dep: dict[tuple[int, int], float] = {}
    for c in range(n_qubits):
        for t in range(n_qubits):
            if c == t:
                continue
            err, _ = pairs.get((c, t), pairs.get((t, c), (mean_err, mean_dur)))
            trace = _relax_ptm_trace(cnot_ad[c], cnot_pd[c]) * _relax_ptm_trace(
                cnot_ad[t], cnot_pd[t]
            )
            pair_dep[(c, t)] = depolarizing_share(err, trace, 4)
    source = {
        "backend": backend.name,
        "backend_qubits": backend.num_qubits,
        "snapshot_date": _snapshot_date(backend),
        "one_qubit_gate": one_q,
        "two_qubit_gate": two_q,
        "cnot_duration_s": cnot_time,
        "layout": "wire i = physical qubit i; connectivity ignored (uncoupled pairs: mean error)",
    }
    return NoiseParams(
        n_qubits,
        depolarizing=dep,
        amplitude_damping=ad,
        phase_damping=pd,
        readout_01=ro.copy(),
        readout_10=ro.copy(),
        depolarizing_2q=0.0,
        pair_depolarizing=pair_dep,
        cnot_amplitude_damping=cnot_ad,
        cnot_phase_damping=cnot_pd,
        pulses=dict(PULSES),
        source=source,
    )
