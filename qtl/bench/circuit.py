"""``mode=bench_circuit``: the DQC head's step time per simulator and qubit count.

Each (simulator, n) case runs in its own process (``qtl.bench.circuit_worker``) so peak memory
and compile caches do not mix; a case that crashes, runs out of memory or times out is
recorded as failed and the others go on. Prints a table and writes JSON.
"""

from __future__ import annotations

import ctypes.util
import os
import time
from pathlib import Path
from typing import Any

from qtl.bench.common import machine_info, record, run_worker, worker_env
from qtl.bench.simulators import REQUIRES, available
from qtl.config import BenchCircuitConfig, ConfigError, HeadConfig

_JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)


def jemalloc_path() -> str | None:
    """libjemalloc if installed (Debian: libjemalloc2). XLA's state-sized temporaries are
    otherwise mmap'd and page-faulted anew every step by glibc."""
    for path in _JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("jemalloc")
    return found if found and os.path.isabs(found) else None


def _validate(cfg: BenchCircuitConfig) -> None:
    unknown = [s for s in cfg.simulators if s not in REQUIRES]
    if unknown:
        raise ConfigError(
            f"bench_circuit.simulators: unknown {unknown}; choose from {', '.join(REQUIRES)}."
        )
    bad = [n for n in cfg.qubits if n < 2]
    if bad or not cfg.qubits:
        raise ConfigError(f"bench_circuit.qubits={list(cfg.qubits)}: need qubit counts >= 2.")
    if cfg.steps < 3 or cfg.batch < 1:
        raise ConfigError("bench_circuit.steps must be >= 3 and bench_circuit.batch >= 1.")


def format_table(results: list[dict]) -> str:
    """Markdown table; speed-up is relative to pennylane at the same n when it ran."""
    ref = {
        r["n_qubits"]: r["median_ms"]
        for r in results
        if r["simulator"] == "pennylane" and r["status"] == "ok"
    }
    rows = [
        "| n | simulator | median ms | min ms | compile s | peak RSS GB | steps | vs pennylane |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            rows.append(f"| {r['n_qubits']} | {r['simulator']} | {r['status']} ||||||")
            continue
        speed = ref.get(r["n_qubits"])
        ratio = f"{speed / r['median_ms']:.1f}x" if speed else "-"
        rows.append(
            f"| {r['n_qubits']} | {r['simulator']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['steps_timed']} | {ratio} |"
        )
    return "\n".join(rows)


def bench_circuit(cfg: BenchCircuitConfig, head: HeadConfig) -> dict[str, Any]:
    """Run every (n, simulator) case and write ``cfg.out``; returns the JSON payload."""
    _validate(cfg)
    env = worker_env()
    jemalloc = jemalloc_path() if cfg.jemalloc else None
    if jemalloc:
        env["LD_PRELOAD"] = f"{jemalloc} {env.get('LD_PRELOAD', '')}".strip()
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "allocator": "jemalloc" if jemalloc else "system",
        "config": {
            "batch": cfg.batch,
            "features": cfg.features,
            "depth": head.depth,
            "entangler": str(head.entangler),
            "rotation": str(head.rotation),
        },
        "results": [],
    }
    cases = [(n, sim) for n in cfg.qubits for sim in cfg.simulators]
    print(
        f"qtl bench_circuit: {len(cases)} cases, value_and_grad of the DQC head's BCE, "
        f"batch {cfg.batch}, depth {head.depth}, {head.entangler}/{head.rotation}, "
        f"allocator {payload['allocator']}",
        flush=True,
    )
    out = Path(cfg.out)
    for i, (n, sim) in enumerate(cases, 1):
        case = {
            "simulator": sim,
            "n_qubits": n,
            "batch": cfg.batch,
            "features": cfg.features,
            "depth": head.depth,
            "entangler": str(head.entangler),
            "rotation": str(head.rotation),
            "steps": cfg.steps,
            "warmup": cfg.warmup,
            "max_seconds": cfg.max_seconds,
            "max_state_mb": head.max_state_mb,
            "native_kernel": head.native_kernel,
        }
        print(f"[{i}/{len(cases)}] {sim} n={n} ...", end=" ", flush=True)
        started = time.perf_counter()
        if not available(sim):
            result = {**case, "status": f"skipped: {REQUIRES[sim]} is not installed"}
        else:
            result = run_worker("qtl.bench.circuit_worker", case, env, 2 * cfg.max_seconds + 600)
        record(result, started, payload, out)
    table = format_table(payload["results"])
    print("\n" + table)
    print(f"\nwritten: {out}")
    return payload
