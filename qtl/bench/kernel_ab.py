"""Builds of the whole-circuit kernel, A/B in one process: ``python -m qtl.bench.kernel_ab``.

Builds the kernel library for each requested ISA level (``QTL_ISA``: native, avx512, avx2,
baseline; the ones this CPU lacks are skipped) and any extra library files given (e.g. a build
of an older source), then times forward + backward of the study's circuit (ring, RY, depth 3)
per example through the libraries' plain entries, on one thread, the builds alternating round
by round so that a shared machine's drifting load hits all alike. Prints median and min per
build and the largest difference from the first build's results (float32 rounding only).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numpy as np


def plain_case(n: int, batch: int, depth: int = 3, seed: int = 0, entangler: str = "ring") -> tuple:
    """Inputs of the plain entries for the study's circuit family on n qubits (random wire
    vectors and RY layers): (n, m, batch, vec, mats, nets, inv, g)."""
    from qtl.quantum.circuit import CircuitSpec
    from qtl.quantum.fast import _network_columns, compile_plan, network_indices

    plan = compile_plan(CircuitSpec(n_qubits=n, depth=depth, entangler=entangler, rotation="ry"))
    cnots = [p for kind, p in plan.steps if kind == "cnot"] + [plan.folded]
    maps = [network_indices(n, p) for p in cnots]
    nets = np.ascontiguousarray([_network_columns(g) for g, _ in maps], np.int32)
    inv = np.ascontiguousarray([_network_columns(i) for _, i in maps], np.int32)
    m = len(cnots) - 1
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(batch, n, 2)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    t = rng.uniform(0, 2 * np.pi, size=(m, n))
    mats = np.stack([np.cos(t), -np.sin(t), np.sin(t), np.cos(t)], -1).reshape(m, n, 2, 2)
    g = rng.normal(size=(batch, n)).astype(np.float32)
    return n, m, batch, vec, np.ascontiguousarray(mats, np.float32), nets, inv, g


def run_plain(lib: ctypes.CDLL, case: tuple) -> list[np.ndarray]:
    """<Z>, d vec and the Grams of every example, through the library's plain entries."""
    n, m, batch, vec, mats, nets, inv, g = case
    p = ctypes.c_void_p
    z = np.zeros((batch, n), np.float32)
    dv = np.zeros_like(vec)
    gram = np.zeros((batch, m, n, 4), np.float32)
    args = [a.ctypes.data_as(p) for a in (vec, mats, nets)]
    if lib.qtl_statevector_forward_plain(n, m, ctypes.c_int64(batch), *args, z.ctypes):
        raise RuntimeError("forward: bad shapes")
    more = [a.ctypes.data_as(p) for a in (inv, g, dv, gram)]
    if lib.qtl_statevector_backward_plain(n, m, ctypes.c_int64(batch), *args, *more):
        raise RuntimeError("backward: bad shapes")
    return [z, dv, gram]


def libraries(levels: list[str], extra: list[Path], cache: Path) -> dict[str, ctypes.CDLL]:
    """name -> loaded library: one build per ISA level this CPU runs, then the extra files."""
    from qtl.quantum import kernels

    out = {}
    before = os.environ.get("QTL_ISA")
    try:
        for level in levels:
            os.environ["QTL_ISA"] = level
            try:
                out[level] = kernels.load(cache)
            except kernels.KernelUnavailable as err:
                print(f"skipped {level}: {err}")
    finally:
        if before is None:
            os.environ.pop("QTL_ISA", None)
        else:
            os.environ["QTL_ISA"] = before
    for path in extra:
        out[path.name] = ctypes.CDLL(str(path.resolve()))
    return out


def compare(libs: dict[str, ctypes.CDLL], n: int, batch: int, rounds: int) -> dict:
    """Per-build ms per example (median, min) and the largest result difference."""
    case = plain_case(n, batch)
    results = {name: run_plain(lib, case) for name, lib in libs.items()}  # also a warm-up
    first = next(iter(results.values()))
    diff = {
        name: max(float(np.max(np.abs(a - b))) for a, b in zip(r, first, strict=True))
        for name, r in results.items()
    }
    times: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(rounds):
        for name, lib in libs.items():
            t0 = time.perf_counter()
            run_plain(lib, case)
            times[name].append((time.perf_counter() - t0) * 1e3 / batch)
    return {
        name: {
            "median_ms": float(np.median(t)),
            "min_ms": float(np.min(t)),
            "max_abs_diff": diff[name],
        }
        for name, t in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qubits", type=int, default=19)
    p.add_argument("--batch", type=int, default=2, help="examples per timed call")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    p.add_argument("--isa", default="native,avx2,baseline", help="QTL_ISA levels to build")
    p.add_argument("--library", type=Path, action="append", default=[], help="extra builds")
    a = p.parse_args()
    from qtl.quantum import kernels

    # the kernels' own cache: each level's build is keyed apart and kept for the next run
    libs = libraries([s for s in a.isa.split(",") if s], a.library, kernels.cache_dir())
    r = compare(libs, a.qubits, a.batch, a.rounds)
    cpu = kernels.cpu_info()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{cpu['model']}, n={a.qubits}, {a.rounds} rounds, forward + backward; load {load}")
    print("| build | median ms/example | min ms/example | max diff |\n|---|---|---|---|")
    for name, s in r.items():
        print(f"| {name} | {s['median_ms']:.2f} | {s['min_ms']:.2f} | {s['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
