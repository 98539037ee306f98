"""Side-by-side per-label AUROC of every finished run under a directory, then the runs
that failed (with the reason they recorded) and those that never finished.

    python -m qtl.summary multirun/demo

Reads only the run records (results.json, failed.json, run_config.json); the full
statistical report is a separate mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qtl.record.files import Results, RunFiles


def collect(root: Path) -> list[Results]:
    """Every finished run under ``root`` (its results.json), sorted by task, head, seed."""
    runs = [
        RunFiles(p.parent, create=False).read_results()
        for p in sorted(Path(root).rglob("results.json"))
        if "wandb" not in p.parent.parts
    ]
    return sorted((r for r in runs if r), key=lambda r: (r.label or f"{r.task}-{r.head}", r.seed))


def not_finished(root: Path) -> list[tuple[Path, str, str]]:
    """(run dir, "failed" | "unfinished", reason) of every run under ``root`` without
    results.json: failed.json gives the reason; otherwise it was killed or is running."""
    dirs = {p.parent for p in Path(root).rglob("run_config.json")}
    dirs |= {p.parent for p in Path(root).rglob("failed.json")}
    out = []
    for d in sorted(dirs):
        files = RunFiles(d, create=False)
        if files.status() == "finished" or "wandb" in d.parts:
            continue
        failure = files.read_failure()
        if failure is not None:
            out.append((d, "failed", failure.headline))
        else:
            out.append((d, "unfinished", "no results.json (killed, still running or requeued)"))
    return out


def table(runs: list[Results], split: str) -> str:
    """Labels as rows, one column per run (task/head/seed)."""
    runs = [r for r in runs if split in r.auroc]
    if not runs:
        return f"(no run evaluated on '{split}')"
    labels: list[str] = []
    for r in runs:
        labels += [x for x in r.labels if x not in labels]
    # runs with per-label AUROC: CXR; a synthetic-data run's column is starred
    mixed = len({r.synthetic for r in runs}) > 1
    cols = [f"{r.task}/{r.head}/s{r.seed}" + ("*" if mixed and r.synthetic else "") for r in runs]
    width = max(len(x) for x in [*labels, "mean AUROC"])
    cw = max(10, *(len(c) for c in cols))
    out = [f"{split} AUROC".ljust(width) + "  " + "  ".join(c.rjust(cw) for c in cols)]
    if all(r.synthetic for r in runs):
        out.insert(0, f"{split} (synthetic data):")
    elif mixed:
        out.insert(0, f"{split} (* = synthetic data):")
    for name in [*labels, "mean AUROC"]:
        cells = []
        for r in runs:
            block = r.auroc[split]
            v = block.mean if name == "mean AUROC" else block.per_label.get(name)
            cells.append((f"{v:.3f}" if v is not None else "n/a").rjust(cw))
        out.append(name.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qtl.summary",
        description="Per-label test AUROC of every finished run under a folder, and the "
        "runs that did not finish (read from the run records alone).",
    )
    parser.add_argument("root", nargs="?", default="multirun", help="sweep or output folder")
    root = Path(parser.parse_args(sys.argv[1:] if argv is None else argv).root)
    runs = collect(root)
    others = not_finished(root)
    if runs:
        synthetic = sum(r.synthetic for r in runs)
        some = "" if synthetic == len(runs) else f" ({synthetic} of them)"
        note = f" - trained and tested on qtl's synthetic data{some}" if synthetic else ""
        print(f"\n{len(runs)} finished run(s) under {root}{note}\n")
        for split in ("test", "external"):
            print(table(runs, split) + "\n")
        for r in runs:
            w = r.wall_seconds
            print(
                f"{r.run}: best epoch {r.best_epoch}/{r.epochs}, "
                f"train {w.get('train', 0):.0f}s, data {w.get('data', 0):.0f}s"
                + (" (synthetic data)" if r.synthetic else "")
            )
    else:
        print(f"no results.json under {root}", file=sys.stderr)
    if others:
        print(f"\n{len(others)} run(s) not finished:")
        for d, state, reason in others:
            print(f"  {state:<10} {d}: {reason}")
    return 0 if runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
