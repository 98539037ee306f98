"""The fast simulator's CPU paths, A/B in one process: ``python -m qtl.bench.native_ab``.

Compiles value_and_grad of the dressed head's BCE three times: ``xla`` (XLA ops only,
``head.native_kernel=false``), ``gram`` (XLA's per-layer ops with the native rotation-gradient
kernel) and ``state`` (the whole circuit in the native kernel, the default), and times them
alternately in one process. A VM's speed can drift by more than the difference between two
variants over a few minutes; alternating makes the drift hit all alike. Prints median, 25th
percentile and min per variant, each one's change against ``xla``, and the largest difference
between their losses and gradients (they must agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import time

VARIANTS = (("xla", False), ("gram", "gram"), ("state", True))


def compare(n: int, batch: int, features: int, steps: int) -> dict:
    """Per-variant step times (ms) and the largest result difference; ``steps`` rounds."""
    import jax
    import numpy as np

    from qtl.bench.common import head_case
    from qtl.quantum.dressed import head_loss
    from qtl.quantum.fast import fast_circuit, native_ok

    spec, args = head_case(n, batch, features)
    compiled = {}
    for name, native in VARIANTS:
        step = jax.value_and_grad(head_loss(fast_circuit(spec, native=native)))
        compiled[name] = jax.jit(step).lower(*args).compile()
        for _ in range(2):
            jax.block_until_ready(compiled[name](*args))
    leaves = {name: jax.tree.leaves(c(*args)) for name, c in compiled.items()}
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for name, _ in VARIANTS[1:]
        for a, b in zip(leaves["xla"], leaves[name], strict=True)
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
    print("| variant | median ms | p25 ms | min ms | median vs xla |\n|---|---|---|---|---|")
    for name, _ in VARIANTS:
        s = r[name]
        change = s["median_ms"] / r["xla"]["median_ms"] - 1
        cells = f"{s['median_ms']:.1f} | {s['p25_ms']:.1f} | {s['min_ms']:.1f} | {change:+.1%}"
        print(f"| {name} | {cells} |")
    print(f"largest result difference from xla: {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
