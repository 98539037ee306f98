"""Scaling of one run over devices: throughput and efficiency of the real training loop.

Each case is a whole run (``launch.py``, ``train.devices=N`` in each of ``train.processes=P``
local processes joined by JAX's distributed runtime on a free port) with the same global
batch; an epoch's wall time after the first (which compiles) gives images per second, and
efficiency is throughput(N x P) / (N x P x throughput(1 x 1)). On a CPU the devices are XLA's
host devices (``--xla_force_host_platform_device_count``) sharing the machine's cores, and
the processes share them too, so the numbers there measure the sharded program's overhead
(and gloo's, across processes), not a speed-up; on a multi-GPU machine
(``scripts/gpu-bench.sh``) the same command measures the real one.

    python -m qtl.bench.devices --devices 1 2 --out bench/devices-cpu.json
    python -m qtl.bench.devices --devices 1 --processes 1 2 --out bench/processes-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qtl.bench.common import machine_info, write_json

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OVERRIDES = (
    "debug=tiny",
    "head=dqc",
    "train.max_epochs=3",
    "train.patience=10",
    "train.batch_size=32",
    "data.synth_sizes.train=512",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(
    devices: int, visible: int, overrides: list[str], workdir: Path, processes: int = 1
) -> dict[str, Any]:
    """One training run on ``devices`` of ``visible`` devices in each of ``processes``
    processes; its per-epoch throughput."""
    run_dir = workdir / f"devices{devices}-processes{processes}"
    env = dict(os.environ)
    if visible > 1 and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={visible}"
        ).strip()
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        *overrides,
        f"train.devices={devices}",
        f"hydra.run.dir={run_dir}",
    ]
    if processes > 1:
        cmd += [f"train.processes={processes}", f"train.coordinator=127.0.0.1:{_free_port()}"]
    gpus = shutil.which("nvidia-smi") is not None and processes > 1

    def env_of(i: int) -> dict[str, str]:  # on GPUs each process gets its own
        if not gpus:
            return env
        return env | {
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(i * devices, (i + 1) * devices)))
        }

    procs = [
        subprocess.Popen(
            cmd + ([f"train.process_id={i}"] if processes > 1 else []),
            cwd=workdir,
            env=env_of(i),
            stdout=subprocess.DEVNULL if i else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outs = [p.communicate() for p in procs]
    failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        return {
            "devices": devices,
            "processes": processes,
            "ok": False,
            "error": f"process {failed}: " + outs[failed][1].strip()[-1500:],
        }
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    batch = next(int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.batch_size="))
    steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}, *rows], rows, strict=False)]
    timed = list(zip(steps, rows, strict=True))[1:]  # the first epoch compiles the steps
    images = sum(s * batch for s, _ in timed)
    seconds = sum(r["seconds"] for _, r in timed)
    return {
        "devices": devices,
        "processes": processes,
        "ok": True,
        "epochs_timed": len(timed),
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": images / seconds if seconds else None,
        "val_loss": rows[-1]["val_loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m qtl.bench.devices", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--devices", type=int, nargs="+", default=[1, 2], help="devices per process, cases"
    )
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1], help="processes per run, cases"
    )
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=list(DEFAULT_OVERRIDES),
        help="launch.py overrides of every case (must set train.batch_size)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench") / "devices-cpu.json")
    args = parser.parse_args(argv)
    if not any(o.startswith("train.batch_size=") for o in args.overrides):
        parser.error("--overrides must set train.batch_size (the global batch of every case)")
    visible = max(args.devices)
    cases = []
    with tempfile.TemporaryDirectory(prefix="qtl-bench-devices-") as tmp:
        for p in args.processes:
            for n in args.devices:
                case = run_case(n, visible, args.overrides, Path(tmp), processes=p)
                cases.append(case)
                shown = f"{case['images_per_s']:.1f} img/s" if case["ok"] else "failed"
                print(f"devices={n} processes={p}: {shown}", flush=True)
    base = next((c for c in cases if c["ok"] and c["devices"] == 1 and c["processes"] == 1), None)
    for c in cases:
        if base and c["ok"] and base["images_per_s"]:
            total = c["devices"] * c["processes"]
            c["efficiency"] = c["images_per_s"] / (total * base["images_per_s"])
    payload = {"machine": machine_info(), "overrides": args.overrides, "cases": cases}
    write_json(args.out, payload)
    print(f"{'devices':>8} {'processes':>9} {'img/s':>8} {'efficiency':>10}")
    for c in cases:
        if c["ok"]:
            eff = c.get("efficiency", float("nan"))
            print(f"{c['devices']:>8} {c['processes']:>9} {c['images_per_s']:>8.1f} {eff:>10.2f}")
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
