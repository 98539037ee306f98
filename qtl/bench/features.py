"""``mode=bench_features``: what training on cached features costs at NIH-CXR-LT's size.

On a synthetic feature set with NIH-CXR-LT's split sizes (``bench_features.sizes``, width
2048, non-negative like pooled ReLU features, labels drawn from a planted linear model so
that AUROC means something):

* **CDL epoch**: one whole epoch through the trainer's own pieces - the loader's shuffled
  padded batches, the head's jitted train step (``qtl.train.features``), then the validation
  pass - timed after a compiling warm-up step;
* **DQC epoch** (fast simulator, with ``head.max_state_mb`` and ``head.native_kernel`` as
  configured): ``dqc_seconds`` of training steps and a slice of the
  validation pass are timed; the epoch time is extrapolated from the median step times
  (recorded as such: ``extrapolated: true``);
* **float16 vs float32 storage**: the CDL epoch trained on each, the same seed and batches;
  the largest validation probability difference and the mean AUROC of each, and the chunk
  bytes per image (zstd at ``features.level`` and raw);
* **extraction**: ResNet-50 (random weights: the rate does not depend on their values) at
  ``extract_px``, images/s over ``extract_images`` images after a warm-up batch.

The machine's load average goes into the JSON with the numbers: other work slows them all.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qtl.config import BackboneConfig, BatchNormMode, HeadConfig, HeadName, QtlConfig, Simulator
from qtl.data.features import encode_chunk
from qtl.data.loader import batches, num_batches
from qtl.evaluate.metrics import mean_auroc, per_label_auroc
from qtl.evaluate.predict import predict
from qtl.labels import ALL_LABELS


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def synthetic_features(sizes: dict[str, int], width: int, labels: int, seed: int = 0) -> dict:
    """Per split (features float32 (n, width) >= 0, labels (n, labels) in {0, 1})."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, labels)).astype(np.float32) / np.sqrt(width)
    bias = np.log(0.05 / 0.95)  # ~5% positives per label, NIH-like imbalance
    out = {}
    for name, n in sizes.items():
        x = np.abs(rng.standard_normal((n, width), dtype=np.float32))
        logits = 3.0 * (x - 0.8) @ w + bias + rng.standard_normal((n, labels), dtype=np.float32)
        out[name] = (x, (logits > 0).astype(np.float32))
    return out


def _head(cfg: QtlConfig, name: HeadName, width: int, labels: int) -> Any:
    from flax import nnx

    from qtl.models.heads import make_head

    hc = HeadConfig(
        name=name,
        simulator=Simulator.fast,
        max_state_mb=cfg.head.max_state_mb,
        native_kernel=cfg.head.native_kernel,
    )
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    return make_head(hc, width, labels, rngs=nnx.Rngs(params=key)), hc


def _steps(cfg: QtlConfig, head: Any, batch: int) -> tuple[Any, Any]:
    from dataclasses import replace

    from qtl.train.features import init_feature_state, make_feature_steps

    run = replace(cfg, train=replace(cfg.train, batch_size=batch))
    steps = make_feature_steps(head, run)
    return steps, init_feature_state(head, steps.tx)


def time_epoch(
    cfg: QtlConfig,
    name: HeadName,
    data: dict,
    *,
    batch: int,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """One epoch (train + validation) of a head; with ``budget_s`` a timed part of it,
    extrapolated to the whole epoch from the median step times."""
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    width, labels = train_x.shape[1], train_y.shape[1]
    head, _ = _head(cfg, name, width, labels)
    steps, state = _steps(cfg, head, batch)
    n_batches = num_batches(len(train_x), batch)
    eval_batch = cfg.train.eval_batch_size
    t0 = time.perf_counter()
    first = next(batches(train_x, train_y, batch, seed=cfg.seed, epoch=0))
    state, loss = steps.train_step(state, first.images, first.labels, first.mask, first.key)
    jax.block_until_ready(loss)
    warm = {"compile_and_first_step_s": round(time.perf_counter() - t0, 2)}
    result: dict[str, Any] = {"head": str(name), "batches": n_batches, "batch": batch, **warm}
    times: list[float] = []
    t_train = time.perf_counter()
    last = t_train
    losses = []
    for i, b in enumerate(batches(train_x, train_y, batch, seed=cfg.seed, epoch=1)):
        state, loss = steps.train_step(state, b.images, b.labels, b.mask, b.key)
        losses.append(loss)
        if budget_s is not None:
            jax.block_until_ready(loss)
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if now - t_train > budget_s and i >= 5:
                break
    jax.block_until_ready(losses[-1])
    train_s = time.perf_counter() - t_train
    if budget_s is None:
        t_val = time.perf_counter()
        probs, val_loss = predict(steps.eval_step, state, val_x, val_y, eval_batch)
        val_s = time.perf_counter() - t_val
        auroc = mean_auroc(per_label_auroc(val_y, probs, list(ALL_LABELS[:labels])))
        result |= {
            "extrapolated": False,
            "train_s": round(train_s, 2),
            "val_s": round(val_s, 2),
            "epoch_s": round(train_s + val_s, 2),
            "val_loss": round(float(val_loss), 5),
            "val_mean_auroc": round(float(auroc), 5),
            "_probs": probs,
        }
        return result
    step_s = float(np.median(times[1:] or times))
    n_val = num_batches(len(val_x), eval_batch)
    k = min(n_val, max(3, int(len(times) * batch / eval_batch) // 4))  # a slice of val
    sl = slice(0, k * eval_batch)
    predict(steps.eval_step, state, val_x[:eval_batch], val_y[:eval_batch], eval_batch)  # compile
    t_val = time.perf_counter()
    predict(steps.eval_step, state, val_x[sl], val_y[sl], eval_batch)
    val_batch_s = (time.perf_counter() - t_val) / k
    result |= {
        "extrapolated": True,
        "timed_steps": len(times),
        "timed_train_s": round(train_s, 2),
        "median_step_s": round(step_s, 4),
        "timed_val_batches": k,
        "val_batch_s": round(val_batch_s, 4),
        "train_s": round(step_s * n_batches, 1),
        "val_s": round(val_batch_s * n_val, 1),
        "epoch_s": round(step_s * n_batches + val_batch_s * n_val, 1),
    }
    return result


def storage(data: dict, level: int) -> dict[str, Any]:
    """Chunk bytes per image of the training split's first 2048 vectors, per dtype."""
    x = data["train"][0][:2048]
    out = {}
    for dtype in ("float16", "float32"):
        arr = x.astype(dtype)
        out[dtype] = {
            "raw_bytes_per_image": arr.nbytes / len(arr),
            f"zstd{level}_bytes_per_image": round(len(encode_chunk(arr, level)) / len(arr), 1),
        }
    return out


def extraction_rate(images: int, px: int, batch: int) -> dict[str, Any]:
    """ResNet-50 pooled features per second at ``px``² on this machine's JAX backend."""
    from flax import nnx

    from qtl.models.resnet import ResNet
    from qtl.train.features import make_embed

    backbone = ResNet(
        BackboneConfig(name="resnet50", batch_norm=BatchNormMode.inference),
        rngs=nnx.Rngs(params=jax.random.key(0)),
    )
    embed = make_embed(backbone)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, px, px), dtype=np.uint8)
    t0 = time.perf_counter()
    embed(x)
    compile_s = time.perf_counter() - t0
    n = max(1, -(-images // batch))
    t0 = time.perf_counter()
    for _ in range(n):
        embed(x)
    seconds = time.perf_counter() - t0
    return {
        "images": n * batch,
        "batch": batch,
        "px": px,
        "seconds": round(seconds, 2),
        "images_per_s": round(n * batch / seconds, 2),
        "compile_and_first_batch_s": round(compile_s, 2),
        "device": str(jax.devices()[0].device_kind),
    }


def bench_features(cfg: QtlConfig, run_dir: Path | None = None) -> dict[str, Any]:
    b = cfg.bench_features
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "native_kernel": cfg.head.native_kernel,
        "max_state_mb": cfg.head.max_state_mb,
        "what": "head epochs on NIH-sized synthetic features; ResNet-50 extraction rate",
        "sizes": dict(b.sizes),
        "width": b.width,
        "labels": b.labels,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": jax.default_backend(),
        "load_before": _load(),
    }
    every = synthetic_features(dict(b.sizes), b.width, max(b.labels, *b.dqc_qubits))
    data32 = {k: (x, y[:, : b.labels]) for k, (x, y) in every.items()}
    data16 = {k: (x.astype(np.float16), y) for k, (x, y) in data32.items()}
    labels16 = {k: y for k, (_, y) in every.items()}
    print(f"[qtl] synthetic features ready in {time.perf_counter() - t0:.1f}s")
    report["storage"] = storage(data32, cfg.features.level)
    cdl16 = time_epoch(cfg, HeadName.cdl, data16, batch=b.batch)
    print(f"[qtl] CDL-{b.labels} epoch on float16 features: {cdl16['epoch_s']} s")
    cdl32 = time_epoch(cfg, HeadName.cdl, data32, batch=b.batch)
    print(f"[qtl] CDL-{b.labels} epoch on float32 features: {cdl32['epoch_s']} s")
    diff = float(np.abs(cdl16.pop("_probs") - cdl32.pop("_probs")).max())
    report["cdl"] = {"float16": cdl16, "float32": cdl32}
    report["float16_vs_float32"] = {
        "max_abs_val_prob_diff": diff,
        "val_mean_auroc_diff": round(cdl16["val_mean_auroc"] - cdl32["val_mean_auroc"], 6),
    }
    report["load_after_cdl"] = _load()
    report["dqc_fast"] = {}
    for qubits in b.dqc_qubits:  # one qubit per label: the first `qubits` labels
        sub = {k: (x, labels16[k][:, :qubits]) for k, (x, _) in data16.items()}
        dqc = time_epoch(cfg, HeadName.dqc, sub, batch=b.batch, budget_s=b.dqc_seconds)
        print(f"[qtl] DQC-{qubits} (fast) epoch, extrapolated: {dqc['epoch_s']} s")
        report["dqc_fast"][f"dqc{qubits}"] = dqc
    report["load_after_dqc"] = _load()
    del data16, data32, every, labels16
    report["extraction_resnet50"] = extraction_rate(
        b.extract_images, b.extract_px, cfg.features.batch_size
    )
    print(f"[qtl] ResNet-50 extraction: {report['extraction_resnet50']['images_per_s']} img/s")
    report["load_after"] = _load()
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(os.path.expandvars(b.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[qtl] wrote {out}")
    return report
