"""The MedMNIST study's section of the report (``experiment=qvit`` sweeps): per dataset, AUC and ACC
mean +- sd per model and distillation, paired t-tests over seeds (QViT vs ViT at each
distillation; KD vs scratch for each model), parameters and per-image FLOPs, the teachers'
scores, beside the paper's headline numbers and the MedMNIST v2 ResNet-18 anchors.

``python -m qtl.report.qvit <sweep>`` prints the per-run AUC/ACC table (``make demo-qvit``).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtl.record.schema import Results
from qtl.report.collect import ReportError, Sweep, collect
from qtl.report.stats import mean_sd, paired, stars

STUDY = "medmnist"  # the run records this section reports (qtl.studies.medmnist)

# Yang et al., MedMNIST v2 (Scientific Data 2023): ResNet-18 at 28 px, test AUC / ACC
# (None: not given there)
RESNET18_ANCHORS: dict[str, tuple[float, float | None]] = {
    "pathmnist": (0.983, 0.907),
    "dermamnist": (0.917, 0.735),
    "pneumoniamnist": (0.944, 0.854),
    "retinamnist": (0.717, 0.524),
    "breastmnist": (0.901, 0.863),
    "chestmnist": (0.768, None),
}
# Boucher & Mazomenos, arXiv 2503.07294, abstract (means over its eight datasets)
PAPER_HEADLINE = {
    "qvit": {"auc": 0.863, "acc": 0.710},
    "vit": {"auc": 0.846, "acc": 0.687},
    "retinamnist_qvit_acc": 0.565,
    "retinamnist_qvit_params": "~1K",
}


@dataclass(frozen=True)
class QRun:
    """One finished MedMNIST run, as the report reads it."""

    dir: Path
    dataset: str
    model: str
    distill: str
    seed: int
    results: Results

    def score(self, metric: str, split: str = "test") -> float | None:
        value = self.results.metrics.get(split, {}).get(metric)
        return None if value is None or not math.isfinite(value) else float(value)


def collect_runs(root: Path | str, skip: Path | None = None) -> list[QRun]:
    """Every finished MedMNIST run under ``root`` (teachers' own folders included if there)."""
    try:
        sweep = collect(root, skip=skip)
    except ReportError:
        return []
    return runs_of(sweep)


def runs_of(sweep: Sweep) -> list[QRun]:
    """The finished MedMNIST runs of a collected sweep, as this report reads them."""
    out = []
    for run in sweep.of_study(STUDY).finished:
        res = run.results
        assert res is not None
        out.append(
            QRun(
                run.dir, res.dataset or res.task, res.model or res.head, res.distill, res.seed, res
            )
        )
    return out


def _fmt(mean: float, sd: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if math.isfinite(sd) else "")


def _test_row(ds: str, metric: str, label: str, a: Any, b: Any, alpha: float) -> list[str]:
    """One paired t-test row: ``a`` vs ``b`` matched by seed."""
    c = paired(_per_seed(a, metric), _per_seed(b, metric))
    return [
        ds,
        metric.upper(),
        label,
        str(c.n),
        f"{c.diff:+.3f}" if c.n else "n/a",
        f"{c.p:.3g}" if math.isfinite(c.p) else "n/a",
        stars(c.p, alpha),
    ]


def _per_seed(runs: list[QRun], metric: str) -> dict[int, float | None]:
    return {r.seed: r.score(metric) for r in runs}


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(runs: list[QRun]) -> list[list[str]]:
    """One row per run: dataset, model, distill, seed, best epoch, test AUC and ACC."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.dataset, r.model, r.distill, r.seed)):
        auc, acc = r.score("auc"), r.score("acc")
        rows.append(
            [
                r.dataset,
                r.model,
                r.distill,
                str(r.seed),
                str(r.results.best_epoch),
                "n/a" if auc is None else f"{auc:.3f}",
                "n/a" if acc is None else f"{acc:.3f}",
            ]
        )
    return rows


def _teachers(runs: list[QRun]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        t = r.results.teacher
        if t and t.get("checkpoint_sha256"):
            out.setdefault(r.dataset, {})[t["checkpoint_sha256"]] = t
    return out


def write_qvit_report(sweep: Sweep, out: Path, alpha: float = 0.05, dpi: int = 100) -> Path:
    """report.md, tables/*.md and figures/ for a MedMNIST sweep; returns report.md's path."""
    root = sweep.root
    runs = runs_of(sweep)
    groups: dict[tuple[str, str, str], list[QRun]] = defaultdict(list)
    for r in runs:
        groups[(r.dataset, r.model, r.distill)].append(r)
    datasets = sorted({r.dataset for r in runs})
    (out / "tables").mkdir(parents=True, exist_ok=True)
    lines = [
        f"# QViT vs ViT on MedMNIST: {root}",
        "",
        f"{len(runs)} finished run(s). Test split; mean ± sd over seeds; paired t-tests "
        f"over matched seeds (two-sided, * p < {alpha}).",
        "",
    ]

    score_rows = []
    for (ds, model, kd), rs in sorted(groups.items()):
        auc = mean_sd([v for r in rs if (v := r.score("auc")) is not None])
        acc = mean_sd([v for r in rs if (v := r.score("acc")) is not None])
        costs = rs[0].results.costs.get("total", {})
        flops = costs.get("flops")
        anchor = RESNET18_ANCHORS.get(ds)
        score_rows.append(
            [
                ds,
                model,
                kd,
                str(len(rs)),
                _fmt(*auc),
                _fmt(*acc),
                f"{rs[0].results.parameters.get('total', 0):,}",
                "n/a" if not flops else f"{flops / 1e6:.3f}",
                "n/a"
                if anchor is None
                else f"{anchor[0]:.3f} / " + ("n/a" if anchor[1] is None else f"{anchor[1]:.3f}"),
            ]
        )
    scores = _md_table(
        [
            "dataset",
            "model",
            "distill",
            "seeds",
            "AUC",
            "ACC",
            "params",
            "MFLOPs/image",
            "ResNet-18 (MedMNIST v2) AUC / ACC",
        ],
        score_rows,
    )
    lines += ["## Scores per dataset", "", scores, ""]

    test_rows = []
    models = sorted({r.model for r in runs})
    kds = sorted({r.distill for r in runs})
    for ds in datasets:
        for metric in ("auc", "acc"):
            for kd in kds:  # QViT vs ViT at the same distillation
                a, b = groups.get((ds, "qvit", kd)), groups.get((ds, "vit", kd))
                if a and b:
                    test_rows.append(_test_row(ds, metric, f"qvit vs vit ({kd})", a, b, alpha))
            for model in models:  # KD vs scratch for one model
                for kd in (k for k in kds if k != "none"):
                    a, b = groups.get((ds, model, kd)), groups.get((ds, model, "none"))
                    if a and b:
                        label = f"{model}: {kd} vs none"
                        test_rows.append(_test_row(ds, metric, label, a, b, alpha))
    tests = _md_table(["dataset", "metric", "comparison", "pairs", "mean diff", "p", ""], test_rows)
    lines += ["## Paired t-tests", "", tests if test_rows else "(no complete pairs)", ""]

    teacher_rows = []
    for ds, found in sorted(_teachers(runs).items()):
        for sha, t in found.items():
            m = (t.get("metrics") or {}).get("test", {})
            teacher_rows.append(
                [
                    ds,
                    str(t.get("model")),
                    f"{t.get('parameters') or 0:,}",
                    "n/a" if m.get("auc") is None else f"{m['auc']:.3f}",
                    "n/a" if m.get("acc") is None else f"{m['acc']:.3f}",
                    sha[:12],
                ]
            )
    teachers = _md_table(
        ["dataset", "teacher", "params", "test AUC", "test ACC", "checkpoint"], teacher_rows
    )
    lines += [
        "## Teachers (knowledge distillation)",
        "",
        teachers if teacher_rows else "(no distilled runs)",
        "",
    ]

    h = PAPER_HEADLINE
    ours = {}
    for model in ("qvit", "vit"):
        per_ds = [
            mean_sd([v for r in groups.get((ds, model, kd), []) if (v := r.score(m)) is not None])[
                0
            ]
            for ds in datasets
            for kd in kds
            for m in ("auc",)
        ]
        per_acc = [
            mean_sd(
                [v for r in groups.get((ds, model, kd), []) if (v := r.score("acc")) is not None]
            )[0]
            for ds in datasets
            for kd in kds
        ]
        fin = [x for x in per_ds if math.isfinite(x)]
        fin_acc = [x for x in per_acc if math.isfinite(x)]
        ours[model] = (
            sum(fin) / len(fin) if fin else math.nan,
            sum(fin_acc) / len(fin_acc) if fin_acc else math.nan,
        )
    headline = _md_table(
        ["", "QViT AUC", "ViT AUC", "QViT ACC", "ViT ACC"],
        [
            [
                "paper (8 datasets, abstract)",
                f"{h['qvit']['auc']:.3f}",
                f"{h['vit']['auc']:.3f}",
                f"{h['qvit']['acc']:.3f}",
                f"{h['vit']['acc']:.3f}",
            ],
            [
                "this sweep (mean over datasets and distill)",
                f"{ours['qvit'][0]:.3f}",
                f"{ours['vit'][0]:.3f}",
                f"{ours['qvit'][1]:.3f}",
                f"{ours['vit'][1]:.3f}",
            ],
        ],
    )
    lines += [
        "## Beside the paper",
        "",
        headline,
        "",
        f"Paper: RetinaMNIST QViT accuracy {h['retinamnist_qvit_acc']:.3f} with "
        f"{h['retinamnist_qvit_params']} parameters. Synthetic data (data.synthetic) is "
        "not comparable with these numbers; real MedMNIST files are.",
        "",
    ]
    tables = {
        "scores": scores,
        "tests": tests,
        "teachers": teachers,
        "headline": headline,
        "runs": _md_table(
            ["dataset", "model", "distill", "seed", "best epoch", "test AUC", "test ACC"],
            summary_rows(runs),
        ),
    }
    for name, text in tables.items():
        (out / "tables" / f"{name}.md").write_text(text + "\n")
    fig = _figure(groups, datasets, out / "figures", dpi)
    if fig is not None:
        lines += ["## Figure", "", f"![test AUC and ACC]({fig.relative_to(out)})", ""]
    lines += ["## Runs", "", tables["runs"], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    print(f"[qtl] QViT report of {root}: {len(runs)} finished run(s) -> {path}")
    print(scores)
    return path


def _figure(groups, datasets: list[str], folder: Path, dpi: int) -> Path | None:
    """Test AUC and ACC bars (mean ± sd over seeds) per dataset and model/distill."""
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(m, k) for (_, m, k) in groups})
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.5 * len(datasets) * len(keys) / 2, 3.5))
    width = 0.8 / len(keys)
    for ax, metric in zip(axes, ("auc", "acc"), strict=True):
        for j, key in enumerate(keys):
            means, sds = [], []
            for ds in datasets:
                vals = [v for r in groups.get((ds, *key), []) if (v := r.score(metric)) is not None]
                m, s = mean_sd(vals)
                means.append(m if math.isfinite(m) else 0.0)
                sds.append(s if math.isfinite(s) else 0.0)
            xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(datasets))]
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=f"{key[0]} ({key[1]})")
        ax.set_xticks(range(len(datasets)), datasets, rotation=20)
        ax.set_ylabel(f"test {metric.upper()}")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scores.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Print every finished run's test AUC and ACC under a sweep (read from results.json)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qtl.report.qvit",
        description="Every finished MedMNIST run's test AUC and ACC under a sweep, as a table "
        "(the full report: python launch.py mode=report report.sweep=<folder>).",
    )
    parser.add_argument("sweep", help="the sweep folder, e.g. multirun/demo_qvit")
    folder = parser.parse_args(sys.argv[1:] if argv is None else argv).sweep
    runs = collect_runs(Path(folder))
    if not runs:
        raise SystemExit(f"no finished MedMNIST runs under {folder}")
    print(
        _md_table(
            ["dataset", "model", "distill", "seed", "best epoch", "test AUC", "test ACC"],
            summary_rows(runs),
        )
    )
    synthetic = sum(r.results.synthetic for r in runs)
    if synthetic:
        which = "every run" if synthetic == len(runs) else f"{synthetic} of {len(runs)} runs"
        print(f"(synthetic data: {which} trained and tested on qtl's synthetic stand-in)")


if __name__ == "__main__":
    main()
