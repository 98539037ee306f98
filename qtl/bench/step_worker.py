"""One head's full train step in its own process: ``python -m qtl.bench.step_worker '<json>'``.

Builds the model and the jitted train step exactly as a training run does, feeds one fixed
synthetic batch, and prints one JSON line with compile time, median/min step time and peak
memory.
"""

from __future__ import annotations

import time


def run_case(case: dict) -> dict:
    """Compile, warm up and time one head's train step; returns its measurements."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)  # compile time must be real
    from qtl.bench.common import device_peak, rss_gb, time_calls
    from qtl.config import to_schema
    from qtl.data.loader import augment_key
    from qtl.models.classifier import build_model
    from qtl.train.step import init_state, make_steps

    cfg = to_schema(case["config"])
    batch, px, n = cfg.train.batch_size, cfg.data.crop, len(cfg.task.labels)
    model = build_model(cfg, cfg.seed)  # random backbone: step time does not depend on it
    steps = make_steps(model, cfg)
    holder = [init_state(model, cfg, steps.tx)]
    del model
    rng = np.random.default_rng(cfg.seed)
    images = jax.device_put(rng.integers(0, 256, (batch, px, px), dtype=np.uint8))
    labels = jax.device_put((rng.uniform(size=(batch, n)) < 0.2).astype(np.float32))
    mask = jax.device_put(np.ones(batch, np.float32))
    key = augment_key(cfg.seed, 0, 0)
    t0 = time.perf_counter()
    compiled = steps.train_step.lower(holder[0], images, labels, mask, key).compile()
    compile_s = time.perf_counter() - t0

    def call() -> None:
        holder[0], loss = compiled(holder[0], images, labels, mask, key)  # state is donated
        jax.block_until_ready(loss)

    timing = time_calls(
        call, steps=case["steps"], warmup=case["warmup"], max_seconds=case["max_seconds"]
    )
    result = {
        **case,
        "status": "ok",
        "compile_s": compile_s,
        **timing,
        "peak_rss_gb": rss_gb(),
        "device": str(jax.devices()[0].device_kind),
        "final_loss": float(jax.device_get(compiled(holder[0], images, labels, mask, key)[1])),
    }
    device_peak(result)
    return result


if __name__ == "__main__":
    from qtl.bench.common import worker_main

    worker_main(run_case)
