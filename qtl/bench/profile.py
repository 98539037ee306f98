"""Where the fast simulator's step time goes: ``python -m qtl.bench.profile --qubits 19``.

Traces a few value_and_grad steps of the dressed head's BCE (the ``mode=bench_circuit``
case) with ``jax.profiler``, then sums the time of every compiled operation by phase (the
forward pass, its recomputation for the gradient, the backward pass) and by kind and output
shape (e.g. ``dot_general f32[32,32]`` is a rotation group's weight gradient). The numbers
are operation times: on a multi-core CPU, operations overlap and the step's wall time is not
their sum. Prints a table; writes nothing but the trace (``--trace-dir``, else a new temp folder).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

_META = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", re.M)


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, the JAX op path it came from)."""
    return {m.group(1): (m.group(2), m.group(3)) for m in _META.finditer(hlo_text)}


def phase(op_path: str) -> str:
    """fwd | remat | bwd, from the JAX op path of an HLO instruction."""
    if "rematted_computation" in op_path:
        return "remat"
    return "bwd" if "transpose(" in op_path else "fwd"


def summarise(events: list[dict], ops: dict[str, tuple[str, str]], steps: int) -> dict:
    """Per-step milliseconds by phase and by (phase, op kind, output shape)."""
    by_phase: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in ops:
            continue
        shape, path = ops[e["name"]]
        ms = e["dur"] / 1e3 / steps
        by_phase[phase(path)] += ms
        by_kind[(phase(path), path.rsplit("/", 1)[-1], shape)] += ms
    return {"by_phase": dict(by_phase), "by_kind": by_kind.most_common()}


def profile(
    n: int,
    batch: int,
    features: int,
    steps: int,
    max_state_mb: float | None,
    trace_dir: Path | None = None,
    native: bool | str = True,
) -> dict:
    """Compile, warm up, time and trace ``steps`` steps; returns the summary."""
    import jax
    import numpy as np

    from qtl.bench.common import head_case
    from qtl.quantum.dressed import head_loss
    from qtl.quantum.fast import fast_circuit

    spec, (params, feats, labels) = head_case(n, batch, features)
    circuit = fast_circuit(spec, max_state_mb=max_state_mb, native=native)
    step = jax.jit(jax.value_and_grad(head_loss(circuit)))
    compiled = step.lower(params, feats, labels).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(params, feats, labels))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, feats, labels))
        times.append(time.perf_counter() - t0)
    trace_dir = trace_dir or Path(tempfile.mkdtemp(prefix="qtl-profile-"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(compiled(params, feats, labels))
    trace = sorted(trace_dir.glob("**/*.trace.json.gz"))[-1]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    summary = summarise(events, op_table(compiled.as_text()), steps)
    summary["median_ms"] = float(np.median(times) * 1e3)
    summary["trace"] = str(trace)
    return summary


PATHS: dict[str, bool | str] = {"state": True, "gram": "gram", "xla": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qubits", type=int, default=19)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-state-mb", type=float, default=None)
    p.add_argument("--rows", type=int, default=20, help="op kinds to list")
    p.add_argument("--trace-dir", type=Path, default=None, help="default: a new temp folder")
    p.add_argument(
        "--path",
        choices=tuple(PATHS),
        default="state",
        help="state: the whole-circuit kernel (the default on CPU); gram: XLA's per-layer ops "
        "with the native rotation-gradient kernel; xla: XLA only",
    )
    p.add_argument("--no-native", action="store_true", help="the same as --path xla")
    a = p.parse_args()
    native = PATHS["xla" if a.no_native else a.path]
    s = profile(a.qubits, a.batch, a.features, a.steps, a.max_state_mb, a.trace_dir, native)
    phases = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(s["by_phase"].items()))
    print(f"n={a.qubits} batch {a.batch}: step {s['median_ms']:.1f} ms (median, untraced)")
    print(f"operation time per step by phase: {phases}\n")
    print("| ms/step | phase | op | output |\n|---|---|---|---|")
    for (ph, op, shape), ms in s["by_kind"][: a.rows]:
        print(f"| {ms:.1f} | {ph} | {op} | {shape} |")
    print(f"\ntrace (open in ui.perfetto.dev): {s['trace']}")


if __name__ == "__main__":
    main()
