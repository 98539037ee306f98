"""One benchmark case in its own process: ``python -m qtl.bench.circuit_worker '<json>'``.

Times ``jax.value_and_grad`` of the dressed head's BCE loss (Linear -> tanh*pi/2 -> circuit ->
Linear), all head parameters, for one simulator and qubit count. A process per case keeps
peak memory and compile caches from mixing between simulators. Prints one JSON line.
"""

from __future__ import annotations

import os
import time

AGREE_TOL = 1e-4  # a peer's <Z> must match fast's within this (float32 simulators) to be timed


def run_case(case: dict) -> dict:
    """Compile, warm up and time one (simulator, n) case; returns its measurements."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)  # compile time must be real
    from qtl.bench.common import device_peak, rss_gb, time_calls
    from qtl.bench.simulators import make
    from qtl.quantum.circuit import CircuitSpec
    from qtl.quantum.dressed import head_loss, init_params

    n, batch, feats = case["n_qubits"], case["batch"], case["features"]
    spec = CircuitSpec(n, case["depth"], case["entangler"], case["rotation"])
    rng = np.random.default_rng(0)
    f32 = np.float32
    params = {k: v.astype(f32) for k, v in init_params(rng, spec, feats).items()}
    features = rng.normal(size=(batch, feats)).astype(f32)
    labels = (rng.uniform(size=(batch, n)) < 0.2).astype(f32)
    params, features, labels = jax.device_put((params, features, labels))
    rss_before = rss_gb()

    if case["simulator"] == "fast" and case.get("native_kernel", True):
        from qtl.quantum.kernels import statevector_targets

        statevector_targets()  # a first-ever build of the native kernels is not compile time
    circuit = make(
        case["simulator"], spec, case.get("max_state_mb"), case.get("native_kernel", True)
    )
    if case.get("shots") or case.get("depolarizing"):  # qtl.quantum.noise on this circuit
        from types import SimpleNamespace

        from qtl.config import NoiseConfig
        from qtl.quantum.noise import noisy_circuit

        noise = NoiseConfig(
            depolarizing=case.get("depolarizing", 0.0), trajectories=case.get("trajectories", 1)
        )
        opts = SimpleNamespace(shots=case.get("shots"), gradient="adjoint", noise=noise)
        noisy = noisy_circuit(spec, circuit, opts)
        key = jax.random.key(0)
        circuit = lambda x, theta: noisy(x, theta, key)  # noqa: E731
    diff = None
    if case["simulator"] != "fast":  # same circuit? compare <Z> with qtl's fast simulator
        x = jax.numpy.tanh(features[:2] @ params["pre_w"]) * (np.pi / 2)
        other = make("fast", spec)(x, params["theta"])
        mine = circuit(x, params["theta"])
        diff = float(np.max(np.abs(np.asarray(mine) - np.asarray(other))))
        if diff > AGREE_TOL:  # a different circuit's time would mean nothing: report, not timed
            return {
                **case,
                "status": f"disagrees with fast: max |<Z> difference| {diff:.2e} > {AGREE_TOL}",
                "max_abs_diff_vs_fast": diff,
            }
    loss = head_loss(circuit)
    step = loss if case.get("forward_only") else jax.value_and_grad(loss)
    t0 = time.perf_counter()
    if case["simulator"] == "lightning":  # C++ adjoint through a host callback: nothing to jit
        compiled = step
    else:
        compiled = jax.jit(step).lower(params, features, labels).compile()
    compile_s = time.perf_counter() - t0
    timing = time_calls(
        lambda: jax.block_until_ready(compiled(params, features, labels)),
        steps=case["steps"],
        warmup=case["warmup"],
        max_seconds=case["max_seconds"],
    )
    result = {
        **case,
        "status": "ok",
        "compile_s": compile_s,
        **timing,
        "peak_rss_gb": rss_gb(),
        "rss_before_gb": rss_before,
        "device": str(jax.devices()[0].device_kind),
        "allocator": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system",
    }
    if case["simulator"] == "fast":  # which native kernel did the step run, if any?
        from qtl.quantum.kernels import FORWARD, TARGET, selected

        text = compiled.as_text()
        result["native_kernel_used"] = (
            "statevector" if FORWARD in text else "wire_gram" if TARGET in text else None
        )
        # the library's own record of what it was compiled to (ISA level, vector instructions)
        result["kernel"] = {**selected(), "used": result["native_kernel_used"] or "xla"}
        if result["native_kernel_used"] is None:
            result["kernel"]["kernel"] = "xla"
        if case.get("depolarizing"):  # which trajectory simulator (docs/noise.md)
            pauli = result["native_kernel_used"] == "statevector"
            result["trajectory_path"] = "pauli_frame" if pauli else "gate_by_gate"
    device_peak(result)
    if diff is not None:
        result["max_abs_diff_vs_fast"] = diff
    return result


if __name__ == "__main__":
    from qtl.bench.common import worker_main

    worker_main(run_case)
