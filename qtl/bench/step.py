"""``mode=bench_step``: the full train step, CDL head vs DQC head, same backbone and batch.

The study's DQC-19 step was 13x slower than its CDL step (0.80 s vs 0.06 s on an RTX A6000).
This times the real jitted train step (augmentation on device when configured, backbone,
head, masked BCE, Adam update) for each head in its own process
(``qtl.bench.step_worker``), on one synthetic uint8 batch of the configured crop size and
``train.batch_size``. Backbone weights are random: ``backbone.pretrained`` is ignored, as
step time does not depend on the values (and no hub download is needed).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from qtl.bench.common import machine_info, record, run_worker, worker_env
from qtl.config import ConfigError, HeadName, QtlConfig


def _validate(cfg: QtlConfig) -> None:
    b = cfg.bench_step
    if not b.heads:
        raise ConfigError("bench_step.heads is empty; use e.g. [cdl, dqc].")
    if b.steps < 3 or b.warmup < 0 or b.max_seconds <= 0:
        raise ConfigError(
            "bench_step.steps must be >= 3, bench_step.warmup >= 0, bench_step.max_seconds > 0."
        )


def case_config(cfg: QtlConfig, head: HeadName) -> dict[str, Any]:
    """The run config a worker rebuilds: ``cfg`` with this head and no pretrained download."""
    from omegaconf import OmegaConf

    one = dataclasses.replace(
        cfg,
        head=dataclasses.replace(cfg.head, name=head),
        backbone=dataclasses.replace(cfg.backbone, pretrained=None),
    )
    return OmegaConf.to_container(OmegaConf.structured(one), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def format_table(results: list[dict]) -> str:
    """Markdown table; each head's ratio is to the CDL step when that ran."""
    ref = next(
        (r["median_ms"] for r in results if r["head"] == "cdl" and r["status"] == "ok"), None
    )
    rows = [
        "| head | qubits | simulator | median ms | min ms | compile s | peak RSS GB | steps "
        "| vs CDL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sim = r["simulator"] if r["head"] == "dqc" else "-"
        if r["status"] != "ok":
            rows.append(f"| {r['head']} | {r['n_labels']} | {sim} | {r['status']} ||||||")
            continue
        ratio = f"{r['median_ms'] / ref:.2f}x" if ref else "-"
        rows.append(
            f"| {r['head']} | {r['n_labels']} | {sim} | {r['median_ms']:.1f} | "
            f"{r['min_ms']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['steps_timed']} | {ratio} |"
        )
    return "\n".join(rows)


def bench_step(cfg: QtlConfig) -> dict[str, Any]:
    """Time the train step once per head in ``cfg.bench_step.heads``; writes its ``out``."""
    _validate(cfg)
    b = cfg.bench_step
    n_labels = len(cfg.task.labels)
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "task": cfg.task.name,
            "backbone": cfg.backbone.name,
            "batch": cfg.train.batch_size,
            "image_px": cfg.data.crop,
            "augment": cfg.data.augment_on.value,
            "simulator": cfg.head.simulator.value,
        },
        "results": [],
    }
    print(
        f"qtl bench_step: {cfg.backbone.name} + {', '.join(h.value for h in b.heads)} heads, "
        f"{cfg.task.name} ({n_labels} labels), batch {cfg.train.batch_size}, "
        f"{cfg.data.crop}x{cfg.data.crop}",
        flush=True,
    )
    out = Path(b.out)
    for i, head in enumerate(b.heads, 1):
        case = {
            "head": head.value,
            "n_labels": n_labels,
            "simulator": cfg.head.simulator.value,
            "steps": b.steps,
            "warmup": b.warmup,
            "max_seconds": b.max_seconds,
            "config": case_config(cfg, head),
        }
        print(f"[{i}/{len(b.heads)}] {head.value} ...", end=" ", flush=True)
        started = time.perf_counter()
        result = run_worker("qtl.bench.step_worker", case, worker_env(), 2 * b.max_seconds + 900)
        result.pop("config", None)
        record(result, started, payload, out)
    print("\n" + format_table(payload["results"]))
    print(f"\nwritten: {out}")
    return payload
