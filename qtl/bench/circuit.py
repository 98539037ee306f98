"""``mode=bench_circuit``: the DQC head's step time per simulator and qubit count.

Each (simulator, n) case runs in its own process (``qtl.bench.circuit_worker``) so peak memory
and compile caches do not mix; a case that crashes, runs out of memory or times out is
recorded as failed and the others go on. The whole grid runs ``rounds`` times, each case in a
fresh process every round: the table gives the median of the round medians, their range and
the range of the speed-ups (each computed within one round), with the load average beside.
Prints a table and writes JSON.
"""

from __future__ import annotations

import ctypes.util
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from qtl.bench.common import machine_info, record, run_worker, worker_env, write_json
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


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: a shared machine's numbers need them beside."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def skipped(case: dict) -> dict:
    """The record of a peer whose package is not installed: a note, never an error."""
    sim = case["simulator"]
    return {**case, "status": f"skipped: {REQUIRES[sim]} is not installed"}


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
    if unknown := [k for k in cfg.noise_cases if k not in NOISE_CASES]:
        raise ConfigError(
            f"bench_circuit.noise_cases: unknown {unknown}; choose from {', '.join(NOISE_CASES)}."
        )
    if cfg.rounds < 1:
        raise ConfigError(f"bench_circuit.rounds={cfg.rounds}: need at least 1 round.")


def summarise(results: list[dict]) -> list[dict]:
    """Per (n, simulator), over its rounds: the median of the round medians, their range, and
    the speed-up vs PennyLane computed within each round (both saw that round's load)."""
    ref = {
        (r["n_qubits"], r.get("round", 1)): r["median_ms"]
        for r in results
        if r["simulator"] == "pennylane" and r["status"] == "ok"
    }
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["n_qubits"], r.get("label", r["simulator"])), []).append(r)
    out = []
    for (n, sim), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row: dict[str, Any] = {"n_qubits": n, "simulator": sim, "rounds": len(rs), "ok": len(ok)}
        if not ok:
            row["status"] = rs[-1]["status"]
            out.append(row)
            continue
        medians = [r["median_ms"] for r in ok]
        ratios = [
            ref[(n, r.get("round", 1))] / r["median_ms"]
            for r in ok
            if (n, r.get("round", 1)) in ref
        ]
        row.update(
            status="ok",
            median_ms=float(np.median(medians)),
            round_medians_ms=medians,
            min_ms=min(r["min_ms"] for r in ok),
            compile_s=float(np.median([r["compile_s"] for r in ok])),
            peak_rss_gb=max(r["peak_rss_gb"] for r in ok),
            steps_timed=sum(r["steps_timed"] for r in ok),
            vs_pennylane=ratios,
        )
        floors = [r["floor_ms"] for r in ok if "floor_ms" in r]
        if floors:
            row["floor_ms"] = floors[0]
            row["x_floor"] = float(np.median(medians)) / floors[0]
        kernels = {_kernel_name(r["kernel"]) for r in ok if "kernel" in r}
        if kernels:
            row["kernel"] = " / ".join(sorted(kernels))
        out.append(row)
    return out


NOISE_CASES = ("shots", "trajectories")


def noise_cases(cfg: BenchCircuitConfig) -> list[tuple[int, int, str]]:
    """(round, n, label) of the shots / trajectory cases (``bench_circuit.noise_cases``)."""
    labels = []
    for kind in cfg.noise_cases:
        if kind == "shots":
            labels += ["fast+forward", f"fast+shots{cfg.noise_shots}+forward"]
        elif kind == "trajectories":
            labels.append(f"fast+depolarizing+K{cfg.noise_trajectories}")
    return [(r, n, lab) for r in range(1, cfg.rounds + 1) for n in cfg.qubits for lab in labels]


def _noise_case(cfg: BenchCircuitConfig, label: str) -> dict[str, Any]:
    out: dict[str, Any] = {"forward_only": label.endswith("+forward")}
    if "+shots" in label:
        out["shots"] = cfg.noise_shots
    if "+depolarizing" in label:
        out["depolarizing"] = cfg.noise_depolarizing
        out["trajectories"] = cfg.noise_trajectories
    return out


def fast_lead(summary: list[dict]) -> list[dict]:
    """Per n: the fastest peer (every simulator but ``fast`` that ran and agreed with it) and
    fast's lead over it, as peer median / fast median (> 1: fast is ahead)."""
    out = []
    for n in sorted({r["n_qubits"] for r in summary}):
        rows = [r for r in summary if r["n_qubits"] == n and r["status"] == "ok"]
        fast = next((r for r in rows if r["simulator"] == "fast"), None)
        peers = [r for r in rows if r["simulator"] != "fast"]
        if fast is None or not peers:
            continue
        best = min(peers, key=lambda r: r["median_ms"])
        out.append(
            {
                "n_qubits": n,
                "best_peer": best["simulator"],
                "peer_median_ms": best["median_ms"],
                "fast_median_ms": fast["median_ms"],
                "lead": best["median_ms"] / fast["median_ms"],
            }
        )
    return out


def format_lead(leads: list[dict]) -> str:
    """One line per n: fast's lead over the best peer."""
    return "\n".join(
        f"n={d['n_qubits']}: fast {d['fast_median_ms']:.1f} ms, best peer {d['best_peer']} "
        f"{d['peer_median_ms']:.1f} ms: fast leads {d['lead']:.1f}x"
        for d in leads
    )


def _kernel_name(kernel: dict | None) -> str:
    """E.g. "statevector, native ISA (avx2+fma)"; "xla" where no native kernel ran."""
    if not kernel or kernel.get("kernel") == "xla":
        return "xla (no native kernel)"
    used = kernel.get("used")
    head = f"{used}, " if used else ""
    return f"{head}{kernel['isa']} ISA ({kernel['vector']})"


def _add_floor(result: dict, head: HeadConfig, gbs: float) -> None:
    """The whole-circuit kernel's memory floor for this case, and the step's distance from it."""
    from qtl.bench.floor import floor_ms, state_passes
    from qtl.quantum.circuit import CircuitSpec
    from qtl.quantum.fast import compile_plan

    if result.get("native_kernel_used") != "statevector":
        return
    n = result["n_qubits"]
    spec = CircuitSpec(n, head.depth, str(head.entangler), str(head.rotation))
    layers = sum(kind == "local" for kind, _ in compile_plan(spec).steps)
    result["floor_passes"] = state_passes(n, layers)
    result["floor_ms"] = floor_ms(n, layers, result["batch"], gbs)
    result["x_floor"] = result["median_ms"] / result["floor_ms"]


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo)
        if len(values) == 1 or fmt.format(lo) == fmt.format(hi)
        else (f"{fmt.format(lo)}–{fmt.format(hi)}")
    )


def format_table(results: list[dict]) -> str:
    """Markdown table over rounds; speed-up is relative to pennylane at the same n, round by
    round, shown as the range of the rounds' ratios."""
    rows = [
        "| n | simulator | median ms | round medians ms | min ms | compile s | peak RSS GB "
        "| steps | vs pennylane | floor ms | x floor | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summarise(results):
        if r["status"] != "ok":
            rows.append(f"| {r['n_qubits']} | {r['simulator']} | {r['status']} ||||||||||")
            continue
        ratio = _span(r["vs_pennylane"], "{:.1f}x") if r["vs_pennylane"] else "-"
        rounds = _span(r["round_medians_ms"], "{:.1f}")
        if r["ok"] < r["rounds"]:
            rounds += f" ({r['rounds'] - r['ok']} failed)"
        rows.append(
            f"| {r['n_qubits']} | {r['simulator']} | {r['median_ms']:.1f} | {rounds} | "
            f"{r['min_ms']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['steps_timed']} | {ratio} | "
            + (f"{r['floor_ms']:.1f} | {r['x_floor']:.1f}x" if "floor_ms" in r else "- | -")
            + f" | {r.get('kernel', '-')} |"
        )
    return "\n".join(rows)


def bench_circuit(cfg: BenchCircuitConfig, head: HeadConfig) -> dict[str, Any]:
    """Run every (n, simulator) case and write ``cfg.out``; returns the JSON payload."""
    _validate(cfg)
    env = worker_env()
    jemalloc = jemalloc_path() if cfg.jemalloc else None
    if jemalloc:
        env["LD_PRELOAD"] = f"{jemalloc} {env.get('LD_PRELOAD', '')}".strip()
    machine = machine_info(bandwidth=True, kernel=True)
    bw = machine["memory_bandwidth"]
    print(
        f"qtl bench_circuit: {machine['cpu']} ({machine['arch']}, {machine['cores']} cores, "
        f"{', '.join(k for k, v in machine['isa'].items() if v) or 'no vector ISA flags'}); "
        f"memory bandwidth {bw['triad_gbs']:.1f} GB/s triad, {bw['copy_gbs']:.1f} GB/s copy "
        f"over {bw['array_mib']:.0f} MiB arrays (LLC {bw['llc_mib']:.0f} MiB); native kernel "
        f"{_kernel_name(machine.get('native_kernel'))}",
        flush=True,
    )
    payload: dict[str, Any] = {
        "machine": machine,
        "allocator": "jemalloc" if jemalloc else "system",
        "config": {
            "batch": cfg.batch,
            "features": cfg.features,
            "depth": head.depth,
            "entangler": str(head.entangler),
            "rotation": str(head.rotation),
            "rounds": cfg.rounds,
        },
        "load_start": load_average(),
        "results": [],
    }
    # round after round, every case in a fresh process: each round's ratio compares runs
    # that saw about the same load, and the rounds show how far a number moves run to run
    cases = [
        (r, n, sim) for r in range(1, cfg.rounds + 1) for n in cfg.qubits for sim in cfg.simulators
    ]
    cases += [(r, n, extra) for r, n, extra in noise_cases(cfg)]
    print(
        f"qtl bench_circuit: {len(cases)} cases, value_and_grad of the DQC head's BCE, "
        f"batch {cfg.batch}, depth {head.depth}, {head.entangler}/{head.rotation}, "
        f"allocator {payload['allocator']}, {cfg.rounds} round(s); load {payload['load_start']}",
        flush=True,
    )
    out = Path(cfg.out)
    for i, (rnd, n, sim) in enumerate(cases, 1):
        case = {
            "round": rnd,
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
        if sim.startswith("fast+"):  # a shots / noise case of the fast simulator
            case.update(simulator="fast", label=sim, **_noise_case(cfg, sim))
        print(f"[{i}/{len(cases)}] round {rnd}: {sim} n={n} ...", end=" ", flush=True)
        started = time.perf_counter()
        if not available(case["simulator"]):
            result = skipped(case)
        else:
            result = run_worker("qtl.bench.circuit_worker", case, env, 2 * cfg.max_seconds + 600)
        result["load"] = load_average()  # the 1/5/15-minute load when the case ended
        if sim == "fast" and result.get("status") == "ok":
            _add_floor(result, head, bw["triad_gbs"])
        record(result, started, payload, out)
        if "floor_ms" in result:
            print(
                f"    kernel {_kernel_name(result.get('kernel'))}; memory floor "
                f"{result['floor_ms']:.2f} ms ({result['floor_passes']} state passes/example at "
                f"{bw['triad_gbs']:.1f} GB/s): {result['x_floor']:.2f}x the floor",
                flush=True,
            )
    payload["summary"] = summarise(payload["results"])
    payload["fast_lead"] = fast_lead(payload["summary"])
    payload["load_end"] = load_average()
    write_json(out, payload)
    table = format_table(payload["results"])
    print("\n" + table)
    if payload["fast_lead"]:
        print(
            "\nfast's lead over the best peer (median over rounds):\n"
            + format_lead(payload["fast_lead"])
        )
    print(f"\nload: {payload['load_start']} at the start, {payload['load_end']} at the end")
    print(f"written: {out}")
    return payload
