"""One Table III case in its own process: ``python -m qtl.bench.step_worker '<json>'``.

Builds one framework's model and train step (JAX: qtl's own jitted train step; PyTorch and
TensorFlow: :mod:`qtl.backends`), feeds the study's batch (zero uint8 images and zero labels,
or zero features with ``head_only``) and times it, waiting for the device after every step in
every framework. Only the case's framework is imported (PennyLane itself imports JAX). A JSON
line is printed after the first step and after every timed step, so the parent keeps what a
case measured even when it kills it for time or memory.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Step = Callable[[], float]  # one synchronised train step; returns the loss


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def _jax_case(case: dict, cfg: Any) -> tuple[Step, dict]:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # compile time must be real

    b, n = case["batch"], case["n_labels"]
    labels = jax.device_put(np.zeros((b, n), np.float32))
    mask = jax.device_put(np.ones(b, np.float32))
    t0 = time.perf_counter()
    if case["head_only"]:
        from functools import partial

        import optax
        from flax import nnx

        from qtl.models.heads import make_head
        from qtl.train.step import masked_bce

        head = make_head(cfg.head, case["features"], n, rngs=nnx.Rngs(params=cfg.seed))
        graph, params, rest = nnx.split(head, nnx.Param, ...)
        tx = optax.adam(cfg.train.lr)
        feats = jax.device_put(np.zeros((b, case["features"]), np.float32))

        @partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, x, y):
            def loss_fn(p):
                return masked_bce(nnx.merge(graph, p, rest, copy=True)(x), y, mask)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        holder = [params, tx.init(params)]
        compiled = step.lower(*holder, feats, labels).compile()

        def call() -> float:
            holder[0], holder[1], loss = compiled(*holder, feats, labels)  # donated
            return float(jax.device_get(loss))  # waits for the device

    else:
        from qtl.data.loader import augment_key
        from qtl.models.classifier import build_model
        from qtl.train.step import init_state, make_steps

        model = build_model(cfg, cfg.seed)
        steps = make_steps(model, cfg)
        state = [init_state(model, cfg, steps.tx)]
        del model
        images = jax.device_put(np.zeros((b, case["image_px"], case["image_px"]), np.uint8))
        key = augment_key(cfg.seed, 0, 0)
        compiled = steps.train_step.lower(state[0], images, labels, mask, key).compile()

        def call() -> float:
            state[0], loss = compiled(state[0], images, labels, mask, key)  # state is donated
            return float(jax.device_get(loss))  # waits for the device

    info = {
        "aot_compile_s": time.perf_counter() - t0,
        "device": str(jax.devices()[0].device_kind),
        "version": jax.__version__,
    }
    return call, info


def _jax_device_peak() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _torch_case(case: dict, cfg: Any) -> tuple[Step, dict]:
    import atexit
    import os
    import shutil
    import tempfile

    from qtl.backends import require

    if case["compile"] == "torch.compile":  # a cold compile, as JAX's and TF's are
        cache = tempfile.mkdtemp(prefix="qtl-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    torch = require("torch")
    from qtl.backends import torch_model as tm

    dev = tm.device()
    model = tm.build(cfg, head_only=case["head_only"])
    step = tm.make_step(model, cfg, compile=case["compile"] == "torch.compile")
    b = case["batch"]
    if case["head_only"]:
        x = torch.zeros((b, case["features"]), dtype=torch.float32, device=dev)
    else:
        x = torch.zeros((b, case["image_px"], case["image_px"]), dtype=torch.uint8, device=dev)
    y = torch.zeros((b, case["n_labels"]), dtype=torch.float32, device=dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    info = {"device": name, "version": torch.__version__, "threads": torch.get_num_threads()}
    return lambda: step(x, y).item(), info  # make_step synchronises the GPU


def _torch_device_peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _tf_case(case: dict, cfg: Any) -> tuple[Step, dict]:
    from qtl.backends import require

    tf = require("tf")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:  # TF grabs every GPU's memory up front otherwise
        tf.config.experimental.set_memory_growth(gpu, True)
    from qtl.backends import tf_model as tfm

    model = tfm.build(cfg, head_only=case["head_only"])
    b = case["batch"]
    if case["head_only"]:
        x = tf.zeros((b, case["features"]), tf.float32)
    else:
        x = tf.zeros((b, case["image_px"], case["image_px"]), tf.uint8)
    y = tf.zeros((b, case["n_labels"]), tf.float32)
    jit = case["compile"] == "xla"
    holder = [tfm.make_step(model, cfg, jit_compile=jit)]
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else "cpu"
    info: dict[str, Any] = {"device": name or "gpu", "version": tf.__version__}

    def call() -> float:
        try:
            return holder[0](x, y)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            if not jit or info.get("xla_error"):
                raise
            # recorded, not hidden: the case then runs as a plain tf.function graph
            info["xla_error"] = str(err).strip().splitlines()[0][:300]
            info["compile"] = "tf.function"
            holder[0] = tfm.make_step(model, cfg, jit_compile=False)
            return holder[0](x, y)

    return call, info


def _tf_device_peak() -> float | None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


_BUILD = {"jax": _jax_case, "torch": _torch_case, "tf": _tf_case}
_DEVICE_PEAK = {"jax": _jax_device_peak, "torch": _torch_device_peak, "tf": _tf_device_peak}


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _summary(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"steps_timed": 0}
    return {
        "steps_timed": len(times),
        "median_s": float(np.median(times)),
        "min_s": float(np.min(times)),
    }


def run_case(case: dict) -> dict:
    """Build, compile (first step), warm up and time one case; returns its record."""
    from qtl.config import to_schema

    cfg = to_schema(case.pop("config"))
    record: dict[str, Any] = {**case, "status": "running"}
    t0 = time.perf_counter()
    call, info = _BUILD[case["framework"]](case, cfg)
    record.update(info, build_s=time.perf_counter() - t0)
    t0 = time.perf_counter()
    loss = call()
    record["compile_s"] = time.perf_counter() - t0 + record.pop("aot_compile_s", 0.0)
    record.update(info, first_loss=loss, peak_mb=_rss_mb())
    _emit(record)

    budget = case["max_seconds"]
    t_start = time.perf_counter()
    done = 0
    while done < case["warmup"] and time.perf_counter() - t_start < budget / 3:
        call()
        done += 1
    record["warmup_done"] = done
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < case["steps"] and (len(times) < 3 or time.perf_counter() - t_start < budget):
        t0 = time.perf_counter()
        loss = call()
        times.append(time.perf_counter() - t0)
        record.update(_summary(times), peak_mb=_rss_mb(), final_loss=loss)
        _emit(record)
    record.update(info, status="ok", device_peak_mb=_DEVICE_PEAK[case["framework"]]())
    return record


if __name__ == "__main__":
    from qtl.bench.common import worker_main

    worker_main(run_case)
