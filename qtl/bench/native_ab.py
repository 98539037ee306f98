"""Native rotation-gradient kernel against XLA GEMMs: ``python -m qtl.bench.native_ab``.

Compiles value_and_grad of the dressed head's BCE twice, with ``head.native_kernel`` on and
off, and times the two alternately in one process. A VM's speed can drift by more than the
difference between the two over a few minutes; alternating makes the drift hit both alike.
Prints median, 25th percentile and min per variant, the change, and the largest difference
between their losses and gradients (they must agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import time


def compare(n: int, batch: int, features: int, steps: int) -> dict:
    """Per-variant step times (ms) and the largest result difference; ``steps`` rounds."""
    import jax
    import numpy as np

    from qtl.bench.common import head_case
    from qtl.quantum.dressed import head_loss
    from qtl.quantum.fast import fast_circuit, native_ok

    spec, args = head_case(n, batch, features)
    compiled = {}
    for name, native in (("xla", False), ("native", True)):
        step = jax.value_and_grad(head_loss(fast_circuit(spec, native=native)))
        compiled[name] = jax.jit(step).lower(*args).compile()
        for _ in range(2):
            jax.block_until_ready(compiled[name](*args))
    leaves = {name: jax.tree.leaves(c(*args)) for name, c in compiled.items()}
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(leaves["xla"], leaves["native"], strict=True)
    )
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(steps):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[name].append((time.perf_counter() - t0) * 1e3)
    stats = {
        name: {
            "median_ms": float(np.median(t)),
            "p25_ms": float(np.percentile(t, 25)),
            "min_ms": float(np.min(t)),
        }
        for name, t in times.items()
    }
    return {"n_qubits": n, "steps": steps, "native_ok": native_ok(), "max_abs_diff": diff, **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qubits", type=int, default=19)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="alternating rounds")
    a = p.parse_args()
    r = compare(a.qubits, a.batch, a.features, a.steps)
    if not r["native_ok"]:
        print("the native kernel is not available here: both variants ran XLA GEMMs")
    print(f"n={a.qubits} batch {a.batch}, {a.steps} alternating steps each")
    print("| variant | median ms | p25 ms | min ms |\n|---|---|---|---|")
    for name in ("xla", "native"):
        s = r[name]
        print(f"| {name} | {s['median_ms']:.1f} | {s['p25_ms']:.1f} | {s['min_ms']:.1f} |")
    change = r["native"]["median_ms"] / r["xla"]["median_ms"] - 1
    diff = r["max_abs_diff"]
    print(f"native vs xla (median): {change:+.1%}; largest result difference {diff:.2e}")


if __name__ == "__main__":
    main()
