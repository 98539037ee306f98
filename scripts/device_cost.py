"""Cost per batch of the circuit on PennyLane devices (docs/noise.md, "Any PennyLane device").

    PYTHONPATH=$PWD python scripts/device_cost.py [--qubits 8] [--batch 32] [--out cost.json]

Times, per case, the forward (<Z> of a batch) and the step (value and gradient with respect
to the angles and the weights), jitted as in training, on the DQC head's circuit (depth 3,
ring, RY): qtl's fast simulator for reference, then each device. Median of ``--repeats``
calls after one warm-up call; prints a table and writes JSON (with the CPU and the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from qtl.config import DeviceConfig, Gradient, HeadConfig, HeadName, NoiseConfig
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.device import device_circuit
from qtl.quantum.fast import fast_circuit

CASES = [  # (label, device, options, shots, gradient, depolarizing)
    ("default.mixed", "default.mixed", {}, None, "adjoint", 0.0),
    ("default.mixed depolarizing 1e-3", "default.mixed", {}, None, "adjoint", 1e-3),
    ("default.mixed shots=1000 param-shift", "default.mixed", {}, 1000, "parameter_shift", 0.0),
    ("lightning.qubit", "lightning.qubit", {}, None, "adjoint", 0.0),
    ("lightning.qubit shots=1000", "lightning.qubit", {}, 1000, "adjoint", 0.0),
    ("qiskit.aer statevector", "qiskit.aer", {"method": "statevector"}, None, "adjoint", 0.0),
    ("qiskit.aer shots=1000", "qiskit.aer", {}, 1000, "adjoint", 0.0),
]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qubits", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="", help="comma-separated labels (default: all)")
    ap.add_argument("--out", default="device_cost.json")
    args = ap.parse_args()
    spec = CircuitSpec(args.qubits, 3)
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (args.batch, spec.n_qubits), minval=-1.5, maxval=1.5)
    theta = jax.random.normal(kt, spec.theta_shape)
    key = jax.random.key(1)
    fast = fast_circuit(spec)
    circuits = {"fast (qtl, exact)": lambda a, t, k: fast(a, t)}
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    for label, name, options, shots, gradient, p in CASES:
        if wanted and label not in wanted:
            continue
        opts = HeadConfig(
            name=HeadName.dqc,
            shots=shots,
            gradient=Gradient(gradient),
            noise=NoiseConfig(depolarizing=p),
            device=DeviceConfig(name=name, options=options),
        )
        circuits[label] = device_circuit(spec, opts)
    rows = []
    load = os.getloadavg()
    for label, f in circuits.items():
        fwd = jax.jit(lambda a, t, f=f: f(a, t, key))
        step = jax.jit(jax.value_and_grad(lambda a, t, f=f: (f(a, t, key) ** 2).sum(), (0, 1)))
        t_fwd, first_fwd = _time(lambda fwd=fwd: fwd(x, theta), args.repeats)
        t_step, first_step = _time(lambda step=step: step(x, theta), args.repeats)
        rows.append(
            {
                "case": label,
                "forward_s": t_fwd,
                "step_s": t_step,
                "first_forward_s": first_fwd,
                "first_step_s": first_step,
            }
        )
        print(
            f"{label:<40} forward {t_fwd * 1e3:9.1f} ms   step {t_step * 1e3:9.1f} ms", flush=True
        )
    out = {
        "qubits": args.qubits,
        "batch": args.batch,
        "depth": 3,
        "repeats": args.repeats,
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "load_before": load,
        "load_after": os.getloadavg(),
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"cpu: {out['cpu']} ({out['cores']} cores), load {load} -> {out['load_after']}")


if __name__ == "__main__":
    jnp.zeros(1)  # start JAX before timing
    main()
