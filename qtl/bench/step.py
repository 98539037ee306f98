"""``mode=bench_step``: Table III, the train step per framework x head x task.

The study's Table III timed three scripts that ran *different* models (torchvision weights with
tanh before the Linear in PyTorch, Keras ResNet50V2 in TF) and never waited for the GPU in
PyTorch and TF. This benchmark times the same network in every framework — the ResNet v1.5 of
``backbone.*`` with the CDL or dressed head (tested equal across frameworks, see
:mod:`qtl.backends`) — on the study's protocol: ``bench_step.batch`` zero uint8 images and zero
labels, ``warmup`` untimed and ``steps`` timed steps of forward, BCE on logits, backward and
Adam, the device synchronised after every step in every framework. No augmentation runs (the
study's benchmark had none), batch norm uses its running statistics (the study's fine-tuning),
weights are random (step time does not depend on them, and nothing is downloaded).

Columns: JAX with PennyLane ``default.qubit`` inside the jitted step (the study's route) and
with qtl's ``fast`` simulator; PyTorch eager and under ``torch.compile`` (PennyLane's torch
interface, backprop; the circuit stays eager, as dynamo cannot trace PennyLane); TensorFlow
under XLA (qtl's TF state-vector circuit). Each case runs in its own process (memory and
compile caches never mix; no framework imports another), capped in time and resident memory:
a case that fails, runs out of memory or out of time is a result in the table, not an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qtl.bench.common import machine_info, worker_env, write_json
from qtl.config import (
    Backend,
    BatchNormMode,
    ConfigError,
    HeadName,
    QtlConfig,
    Simulator,
    TaskConfig,
)

# The study's Table III (RTX A6000, seconds per step, CDL / DQC; PyTorch and TF unsynchronised).
STUDY: dict[str, dict[str, tuple[float, float]]] = {
    "jax": {"cxr8": (0.06, 0.06), "cxr14": (0.06, 0.08), "cxr19": (0.06, 0.80)},
    "torch": {"cxr8": (0.07, 0.13), "cxr14": (0.07, 0.18), "cxr19": (0.07, 1.89)},
    "tf": {"cxr8": (0.06, 0.08), "cxr14": (0.06, 0.43), "cxr19": (0.06, 14.97)},
}
_ENV_NOTED = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "QTL_NATIVE",
    "XLA_FLAGS",
    "CUDA_VISIBLE_DEVICES",
)
FRAMEWORK_NAMES = {"jax": "JAX", "torch": "PyTorch", "tf": "TensorFlow"}
CIRCUIT_NAMES = {
    "pennylane": "PennyLane default.qubit",
    "fast": "qtl fast",
    "statevector": "qtl TF state vector",
}


def _tasks(cfg: QtlConfig) -> list[TaskConfig]:
    from qtl.labels import TASKS

    names = cfg.bench_step.tasks
    if not names:
        return [cfg.task]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(
            f"bench_step.tasks: unknown task(s) {unknown}; use any of {', '.join(TASKS)}."
        )
    return [TaskConfig(name=t, labels=list(TASKS[t])) for t in names]


def backends(cfg: QtlConfig) -> list[Backend]:
    """The frameworks to time: ``bench_step.backends``, or the ``backend`` group's choice."""
    return list(cfg.bench_step.backends or [cfg.backend.name])


def _validate(cfg: QtlConfig) -> None:
    from qtl.backends import check_installed

    b = cfg.bench_step
    checks = [
        ("bench_step.heads", b.heads, bool(b.heads)),
        ("bench_step.steps", b.steps, b.steps >= 3),
        ("bench_step.warmup", b.warmup, b.warmup >= 0),
        ("bench_step.batch", b.batch, b.batch > 0),
        ("bench_step.max_seconds", b.max_seconds, b.max_seconds > 0),
        ("bench_step.case_timeout_s", b.case_timeout_s, b.case_timeout_s > 0),
        ("bench_step.max_rss_gb", b.max_rss_gb, b.max_rss_gb > 0),
        ("bench_step.image_px", b.image_px, b.image_px is None or b.image_px >= 16),
    ]
    for key, value, ok in checks:
        if not ok:
            raise ConfigError(
                f"{key}={value} is out of range (heads non-empty, steps >= 3, warmup >= 0, "
                "batch, max_seconds, case_timeout_s and max_rss_gb > 0, image_px >= 16)."
            )
    if HeadName.dqc in b.heads and Backend.jax in backends(cfg) and not b.jax_simulators:
        raise ConfigError("bench_step.jax_simulators is empty; use e.g. [pennylane, fast].")
    if Backend.torch in backends(cfg) and not b.torch_compile:
        raise ConfigError("bench_step.torch_compile is empty; use e.g. [false, true].")
    _tasks(cfg)
    for backend in backends(cfg):
        check_installed(backend)  # a missing extra is named before any case runs


def case_config(cfg: QtlConfig, task: TaskConfig, head: HeadName, simulator: str | None) -> dict:
    """The run config a worker rebuilds: the study's benchmark protocol on ``cfg``'s model."""
    from omegaconf import OmegaConf

    b = cfg.bench_step
    px = b.image_px or cfg.data.crop
    jax_sim = simulator if simulator in {s.value for s in Simulator} else None
    one = dataclasses.replace(
        cfg,
        task=task,
        head=dataclasses.replace(
            cfg.head, name=head, simulator=Simulator(jax_sim or cfg.head.simulator.value)
        ),
        backbone=dataclasses.replace(
            cfg.backbone, pretrained=None, batch_norm=BatchNormMode.inference
        ),
        data=dataclasses.replace(cfg.data, augment=False, crop=px, resize=max(px, cfg.data.resize)),
        train=dataclasses.replace(
            cfg.train, optimizer="adam", backbone_lr=None, batch_size=b.batch
        ),
    )
    return OmegaConf.to_container(OmegaConf.structured(one), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _columns(cfg: QtlConfig) -> list[tuple[str, str, HeadName, str | None]]:
    """(framework, compile, head, simulator) of every case of one task, in table order."""
    b = cfg.bench_step
    out: list[tuple[str, str, HeadName, str | None]] = []
    for backend in backends(cfg):
        for head in b.heads:
            if backend == Backend.jax:
                sims = [s.value for s in b.jax_simulators] if head == HeadName.dqc else [None]
                out += [("jax", "jit", head, s) for s in sims]
            elif backend == Backend.torch:
                sim = "pennylane" if head == HeadName.dqc else None
                out += [
                    ("torch", "torch.compile" if c else "eager", head, sim) for c in b.torch_compile
                ]
            else:
                sim = "statevector" if head == HeadName.dqc else None
                out.append(("tf", "xla" if b.tf_jit_compile else "tf.function", head, sim))
    order = {"jax": 0, "torch": 1, "tf": 2}
    return sorted(out, key=lambda c: (order[c[0]], c[1] != "eager", c[2] != HeadName.cdl))


def cases(cfg: QtlConfig) -> list[dict[str, Any]]:
    """Every case of the table: tasks x frameworks (and their compile modes) x heads."""
    b = cfg.bench_step
    px = b.image_px or cfg.data.crop
    features = int(cfg.backbone.hidden_sizes[-1])
    out = []
    for task in _tasks(cfg):
        for framework, compile_mode, head, sim in _columns(cfg):
            out.append(
                {
                    "framework": framework,
                    "compile": compile_mode,
                    "head": head.value,
                    "simulator": sim,
                    "task": task.name,
                    "n_labels": len(task.labels),
                    "head_only": b.head_only,
                    "backbone": cfg.backbone.name,
                    "image_px": None if b.head_only else px,
                    "features": features,
                    "batch": b.batch,
                    "steps": b.steps,
                    "warmup": b.warmup,
                    "max_seconds": b.max_seconds,
                    "config": case_config(cfg, task, head, sim),
                }
            )
    return out


# --- running one case under a time and memory cap ---------------------------------------------


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (torch.compile spawns workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(pid, []))
    return total


def _last_record(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_case(case: dict, timeout_s: float, max_rss_gb: float) -> dict[str, Any]:
    """Run one case in a worker process; kill it (and its children) past the caps.

    The worker prints its record after the first step and after each timed one, so a killed
    case keeps what it measured; its status says why it stopped.
    """
    meta = {k: v for k, v in case.items() if k != "config"}
    limit = max_rss_gb * 2**30
    peak, started = 0, time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtl.bench.step_worker", json.dumps(case)],
            stdout=out,
            stderr=err,
            env=worker_env(),
            text=True,
            start_new_session=True,  # one process group: killing it takes compile workers too
        )
        stop = None
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                if os.path.isdir("/proc"):
                    peak = max(peak, _tree_rss_bytes(proc.pid))
                elapsed = time.perf_counter() - started
                if peak > limit:
                    stop = (
                        f"out of memory: its processes reached {peak / 2**30:.1f} GB resident "
                        f"(bench_step.max_rss_gb={max_rss_gb:g})"
                    )
                elif elapsed > timeout_s:
                    stop = f"timed out after {elapsed:.0f} s (bench_step.case_timeout_s)"
                if stop:
                    break
        finally:  # also when this process is interrupted: no worker outlives the benchmark
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    record = _last_record(stdout)
    result = {**meta, **(record or {}), "peak_tree_mb": peak / 2**20}
    if stop:
        result["status"] = stop
    elif proc.returncode != 0 or record is None or record.get("status") != "ok":
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
        tail = (errors or lines)[-1:] or [""]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
        result["status"] = f"{why}: exit {proc.returncode}: {tail[0][:300]}"
    result["wall_s"] = time.perf_counter() - started
    return result


# --- the table ---------------------------------------------------------------------------------


def _secs(x: float) -> str:
    """Seconds with about three significant digits, never in exponent form."""
    if x >= 1:
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    return f"{x:.{max(3, 2 - math.floor(math.log10(max(x, 1e-9))))}f}"


def _short(status: str) -> str:
    """'out of memory: ... (knob)' -> 'out of memory'; 'timed out after 90 s (knob)' stays."""
    return status.split(":")[0].split(" (")[0]


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        short = _short(r.get("status", "failed"))
        if r.get("median_s"):  # killed after some timed steps: what they measured
            return f"{short} ({_secs(r['median_s'])} over {r['steps_timed']} steps)"
        return short
    return _secs(r["median_s"])


def _ratio(dqc: dict | None, cdl: dict | None) -> str:
    if not dqc or not cdl or dqc.get("status") != "ok" or cdl.get("status") != "ok":
        return "-"
    return f"{dqc['median_s'] / cdl['median_s']:.2f}×"


def _pair(
    cdl: dict | None, dqc: dict | None, key: str, scale: float = 1.0, fmt: str = ".1f"
) -> str:
    vals = [f"{r[key] * scale:{fmt}}" if r and r.get(key) is not None else "-" for r in (cdl, dqc)]
    return " / ".join(vals)


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"  # type: ignore[union-attr]


def _find(results: list[dict], **match: Any) -> dict | None:
    for r in results:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def format_table(payload: dict[str, Any]) -> str:
    """Markdown: one row per framework column and task, CDL and DQC, the ratio, the study's."""
    results = payload["results"]
    rows = [
        "| task | framework | step | circuit | CDL s/step | DQC s/step | DQC/CDL | "
        "study CDL / DQC (ratio) | compile s CDL / DQC | peak RSS GB CDL / DQC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns: list[tuple[str, str, str | None]] = []
    for r in results:
        key = (r["framework"], r["compile"], r["simulator"] if r["head"] == "dqc" else None)
        if r["head"] == "dqc" and key not in columns:
            columns.append(key)
    only_cdl = [
        (r["framework"], r["compile"], None)
        for r in results
        if r["head"] == "cdl"
        and not _find(results, framework=r["framework"], compile=r["compile"], head="dqc")
    ]
    columns += [c for c in dict.fromkeys(only_cdl) if c not in columns]
    tasks = list(dict.fromkeys(r["task"] for r in results))
    for task in tasks:
        for framework, compile_mode, sim in columns:
            cdl = _find(results, framework=framework, compile=compile_mode, head="cdl", task=task)
            dqc = (
                _find(
                    results,
                    framework=framework,
                    compile=compile_mode,
                    head="dqc",
                    task=task,
                    simulator=sim,
                )
                if sim
                else None
            )
            if cdl is None and dqc is None:
                continue
            study = STUDY.get(framework, {}).get(task)
            study_txt = (
                f"{study[0]:.2f} / {study[1]:.2f} ({study[1] / study[0]:.1f}×)" if study else "-"
            )

            rows.append(
                f"| {task} ({_n_labels(results, task)}) | {FRAMEWORK_NAMES[framework]} | "
                f"{compile_mode} | {CIRCUIT_NAMES.get(sim or '', '-')} | {_cell(cdl)} | "
                f"{_cell(dqc)} | {_ratio(dqc, cdl)} | {study_txt} | "
                f"{_pair(cdl, dqc, 'compile_s')} | "
                f"{_pair(cdl, dqc, 'peak_mb', 1 / 1024, '.2f')} |"
            )
    lines = ["\n".join(rows)]
    findings = targets(results)
    if findings:
        lines.append("\n".join(f"- {line}" for line in findings))
    return "\n\n".join(lines)


def _n_labels(results: list[dict], task: str) -> int:
    r = _find(results, task=task)
    return int(r["n_labels"]) if r else 0


def targets(results: list[dict]) -> list[str]:
    """Per task: JAX fast DQC against JAX CDL, and every other framework's DQC step against it."""
    out = []
    for task in dict.fromkeys(r["task"] for r in results):
        fast = _find(results, framework="jax", head="dqc", simulator="fast", task=task)
        cdl = _find(results, framework="jax", head="cdl", task=task)
        if not _ok(fast):
            continue
        parts = []
        if _ok(cdl):
            parts.append(f"JAX fast DQC / JAX CDL = {fast['median_s'] / cdl['median_s']:.2f}×")
        others = [
            ("JAX PennyLane DQC", dict(framework="jax", simulator="pennylane")),
            ("PyTorch (eager) PennyLane DQC", dict(framework="torch", compile="eager")),
            (
                "PyTorch (torch.compile) PennyLane DQC",
                dict(framework="torch", compile="torch.compile"),
            ),
            ("TensorFlow ({compile}) DQC", dict(framework="tf")),
        ]
        for label, match in others:
            r = _find(results, head="dqc", task=task, **match)
            if r is None:
                continue
            name = label.format(compile=r.get("compile"))
            if _ok(r):
                parts.append(f"{name} / JAX fast DQC = {r['median_s'] / fast['median_s']:.1f}×")
            else:
                parts.append(f"{name}: {_short(r['status'])}")
        if parts:
            out.append(f"{task}: " + "; ".join(parts))
    return out


def _command() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except Exception:  # called outside Hydra (tests, a notebook)
        overrides = sys.argv[1:]
    return "python launch.py " + " ".join(f"'{o}'" if "[" in o else o for o in overrides)


def _span(values: list[int]) -> str:
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def _protocol(payload: dict[str, Any]) -> str:
    """The steps as run: max_seconds can cut warm-up and timing short, and the table says so."""
    c = payload["config"]
    text = f"{c['warmup']} warm-up + {c['steps']} timed steps"
    ok = [r for r in payload["results"] if r.get("status") == "ok"]
    timed = sorted({r["steps_timed"] for r in ok if r.get("steps_timed")})
    warm = sorted({r["warmup_done"] for r in ok if r.get("warmup_done") is not None})
    if (timed and timed[0] < c["steps"]) or (warm and warm[0] < c["warmup"]):
        text = (
            f"up to {c['warmup']} warm-up + {c['steps']} timed steps, cut short past "
            f"bench_step.max_seconds={c['max_seconds']:g} (at least 3 timed): "
            f"{_span(warm or [0])} warm-up + {_span(timed or [0])} timed steps per case"
        )
    return text


def _write_markdown(md: Path, payload: dict[str, Any], what: str) -> None:
    m, c = payload["machine"], payload["config"]
    load = ", ".join(f"{x:.1f}" for x in m["load_avg_at_start"])
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(
        f"# Table III: seconds per train step\n\n`{payload['command']}`\n\n"
        f"{m['cpu']}, {m['cores']} cores, load average {load} at start; {what}, batch "
        f"{c['batch']}, {_protocol(payload)}"
        + "".join(f", {k}={v}" for k, v in payload.get("env", {}).items())
        + ".\n\n"
        + f"{format_table(payload)}\n"
    )


def bench_step(cfg: QtlConfig) -> dict[str, Any]:
    """Run every case of ``cfg.bench_step``; writes the JSON and the Markdown table."""
    _validate(cfg)
    b = cfg.bench_step
    todo = cases(cfg)
    # `timeout`/`kill` send SIGTERM: exit through Python so the running worker is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    px = b.image_px or cfg.data.crop
    payload: dict[str, Any] = {
        "machine": machine_info(),
        "command": _command(),
        # settings that change speed without changing the command line
        "env": {k: os.environ[k] for k in _ENV_NOTED if k in os.environ},
        "config": {
            "backends": [x.value for x in backends(cfg)],
            "tasks": [t.name for t in _tasks(cfg)],
            "backbone": cfg.backbone.name,
            "head_only": b.head_only,
            "features": int(cfg.backbone.hidden_sizes[-1]),
            "image_px": None if b.head_only else px,
            "batch": b.batch,
            "steps": b.steps,
            "warmup": b.warmup,
            "max_seconds": b.max_seconds,
            "max_rss_gb": b.max_rss_gb,
            "protocol": "zero uint8 images and zero labels, no augmentation, BN on running "
            "statistics, BCE on logits, Adam lr train.lr, device synchronised every step",
        },
        "study": {
            "source": "the study's Table III: RTX A6000, batch 32, 224x224, ResNet-50; "
            "PyTorch and TF timed without synchronising the GPU, on other models",
            "seconds_cdl_dqc": STUDY,
        },
        "results": [],
    }
    what = "head only" if b.head_only else f"{cfg.backbone.name} {px}x{px}"
    print(
        f"qtl bench_step: {len(todo)} cases ({what}, batch {b.batch}, "
        f"{b.warmup} warm-up + {b.steps} timed steps)",
        flush=True,
    )
    out = Path(b.out)
    md = out.with_suffix(".md")
    for i, case in enumerate(todo, 1):
        label = f"{case['framework']}/{case['compile']} {case['head']}"
        label += f" ({case['simulator']})" if case["simulator"] else ""
        print(
            f"[{i}/{len(todo)}] {case['task']} {label}",
            end="\n" if b.dry_run else " ... ",
            flush=True,
        )
        if b.dry_run:
            continue
        result = run_case(case, b.case_timeout_s, b.max_rss_gb)
        payload["results"].append(result)
        if result["status"] == "ok":
            print(
                f"{result['median_s']:.4g} s/step (min {result['min_s']:.4g}, compile "
                f"{result['compile_s']:.1f} s, peak {result['peak_mb'] / 1024:.2f} GB)",
                flush=True,
            )
        else:
            print(result["status"], flush=True)
        # a long benchmark killed late keeps every finished case, in both files
        write_json(out, payload)
        _write_markdown(md, payload, what)
    if b.dry_run:
        print(f"dry run: {len(todo)} cases checked, none run (bench_step.dry_run=true)")
        return payload
    print("\n" + format_table(payload))
    print(f"\nwritten: {out} and {md}")
    return payload
