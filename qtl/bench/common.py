"""What every benchmark shares: a worker process per case, the timing loop, machine facts.

A process per case keeps peak memory and compile caches from mixing between cases; a case
that crashes, runs out of memory or times out is recorded as failed and the others go on.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtl.utils.files import write_json_atomic


def rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def head_case(n: int, batch: int, features: int) -> tuple[Any, tuple]:
    """The study's circuit (ring, RY, depth 3) on n qubits and seeded (params, features,
    labels) for the dressed head's loss: the case the in-process head benchmarks time."""
    import numpy as np

    from qtl.quantum.circuit import CircuitSpec
    from qtl.quantum.dressed import init_params

    spec = CircuitSpec(n_qubits=n, depth=3, entangler="ring", rotation="ry")
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float32) for k, v in init_params(rng, spec, features).items()}
    feats = rng.normal(size=(batch, features)).astype(np.float32)
    labels = (rng.uniform(size=(batch, n)) < 0.2).astype(np.float32)
    return spec, (params, feats, labels)


def machine_info(bandwidth: bool = False, kernel: bool = False) -> dict[str, Any]:
    """CPU model, its vector ISA flags (AVX2, AVX-512, NEON), cores, load and JAX platform; with
    ``kernel``, the native kernel it selects (built now if need be), with ``bandwidth`` the
    measured memory bandwidth: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    from qtl.quantum import kernels

    flags = kernels.cpu_info()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": {k: flags[k] for k in ("avx2", "fma", "avx512f", "neon")},
        "arch": platform.machine(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    if kernel and jax.default_backend() == "cpu":
        info["native_kernel"] = kernels.selected()
    if bandwidth:
        from qtl.bench.floor import memory_bandwidth

        info["memory_bandwidth"] = memory_bandwidth()
    return info


def worker_env() -> dict[str, str]:
    """The environment of a worker: GPU memory on demand, quiet XLA logs."""
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_worker(module: str, case: dict, env: dict, timeout: float) -> dict:
    """Run ``python -m module '<case json>'``; its last JSON stdout line, or a failure record."""
    cmd = [sys.executable, "-m", module, json.dumps(case)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"failed: timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (
        "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    )
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return {**case, "status": f"failed: {reason}: {tail}"}


def time_calls(
    call: Callable[[], Any], *, steps: int, warmup: int, max_seconds: float
) -> dict[str, Any]:
    """Time ``call`` (which must block until its result is ready) after a first call and
    ``warmup`` more; ``steps`` timed calls, fewer (>= 3) once ``max_seconds`` have passed."""
    import numpy as np

    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < steps and (len(times) < 3 or time.perf_counter() < budget_end):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": first_s,
        "steps_timed": len(times),
        "median_ms": float(np.median(times) * 1e3),
        "min_ms": float(np.min(times) * 1e3),
    }


def write_json(path: Path, payload: dict) -> None:
    """Atomic write: a benchmark killed mid-write keeps the previous file."""
    write_json_atomic(path, payload)


def record(result: dict, started: float, payload: dict, out: Path) -> None:
    """Finish one case: its wall time, a one-line summary, and the JSON rewritten at once
    (a long benchmark killed late keeps every case it finished)."""
    result["wall_s"] = time.perf_counter() - started
    payload["results"].append(result)
    if result["status"] == "ok":
        print(
            f"{result['median_ms']:.1f} ms/step (min {result['min_ms']:.1f}, "
            f"compile {result['compile_s']:.1f} s, peak {result['peak_rss_gb']:.2f} GB)",
            flush=True,
        )
    else:
        print(result["status"], flush=True)
    write_json(out, payload)


def device_peak(result: dict) -> None:
    """Add the accelerator's peak memory to ``result`` where the device reports it (GPUs)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30


def worker_main(run_case: Callable[[dict], dict]) -> None:
    """A worker's entry point: the case as JSON in argv[1], the result as one JSON line."""
    case = json.loads(sys.argv[1])
    print(json.dumps(run_case(case)), flush=True)
