"""One report from one sweep: collect -> compare -> tables, figures, report.md (-> W&B)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtl.config import ConfigError, LoggerConfig, LoggerName, ReportConfig
from qtl.report import figures as figs
from qtl.report import markdown
from qtl.report.collect import Sweep, collect
from qtl.report.robustness import append_robustness
from qtl.report.stats import compare
from qtl.report.synthetic import mark_section
from qtl.report.tables import (
    comparison_table,
    convergence_table,
    headline_table,
    mean_auroc_table,
    per_label_table,
    runs_table,
)
from qtl.report.uncertainty import interval_table, roc_figures


def _check(cfg: ReportConfig) -> None:
    if not cfg.sweep:
        raise ConfigError(
            "report.sweep is not set: mode=report needs the multirun folder to report on, "
            "e.g. python launch.py mode=report report.sweep=multirun/demo"
        )
    if not 0.0 < cfg.alpha < 1.0:
        raise ConfigError(f"report.alpha={cfg.alpha} must lie strictly between 0 and 1.")
    if cfg.dpi <= 0:
        raise ConfigError(f"report.dpi={cfg.dpi} must be positive.")


def write_report(cfg: ReportConfig, logger: LoggerConfig | None = None) -> Path:
    """Write report.md, tables/ and figures/ for ``cfg.sweep``; returns report.md's path.

    The sweep is collected once (every results.json read once); each study found in it gets
    its section from the writer registered under its name in :data:`SECTIONS` (a study
    without one gets the generic per-run table). With runs of several studies, each
    section goes to ``<out>/<study>/``.
    """
    _check(cfg)
    root = Path(cfg.sweep)  # type: ignore[arg-type]
    out = Path(cfg.out) if cfg.out else root / "report"
    from qtl.report.search import is_search, write_search_report

    if is_search(root):  # an Optuna search (experiment=search): its trials, not a head comparison
        return write_search_report(root, out, cfg.dpi)
    sweep = collect(root, skip=out)
    studies = sweep.studies
    paths = []
    for study in studies:
        where = out if len(studies) == 1 else out / study
        section = SECTIONS.get(study, generic_section)
        part = sweep.of_study(study)
        paths.append(section(part, where, cfg, logger))
        mark_section(part, where, paths[-1])  # "(synthetic data)" where a reader looks
    report = paths[0] if len(paths) == 1 else _index(out, studies, paths)
    append_robustness(out, report)
    return report


def _index(out: Path, studies: list[str], paths: list[Path]) -> Path:
    lines = ["# Report", ""] + [
        f"- [{s}]({p.relative_to(out)})" for s, p in zip(studies, paths, strict=True)
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def cxr_section(
    sweep: Sweep, out: Path, cfg: ReportConfig, logger: LoggerConfig | None = None
) -> Path:
    """The CXR study's head comparison: AUROC tables, paired t-tests, figures, report.md."""
    root = sweep.root
    comps = compare(sweep)
    tables = {
        "headline": headline_table(comps, cfg.alpha),
        "mean_auroc": mean_auroc_table(sweep),
        "per_label_auroc": per_label_table(sweep),
        "comparison": comparison_table(comps, cfg.alpha),
        "convergence": convergence_table(sweep),
        "runs": runs_table(sweep),
        "auroc_intervals": interval_table(sweep),
    }
    table_files = {name: t.write(out / "tables") for name, t in tables.items()}
    which = [getattr(f, "value", f) for f in cfg.figures]
    figures = figs.draw(which, sweep, comps, cfg.alpha, out / "figures", cfg.dpi)
    figures["roc"] = roc_figures(sweep, out / "figures", cfg.dpi)
    path = out / "report.md"
    path.write_text(markdown.render(sweep, out, tables, table_files, figures, comps, cfg.alpha))
    if logger is not None and logger.name == LoggerName.wandb:
        from qtl.report.wandb_log import log_report

        log_report(logger.wandb, sweep, out, tables, figures)
    print(
        f"[qtl] report of {root}: {len(sweep.finished)} finished, {len(sweep.failed)} failed, "
        f"{len(sweep.missing)} missing run(s) -> {path}"
    )
    print(tables["headline"].markdown())
    return path


def medmnist_section(
    sweep: Sweep, out: Path, cfg: ReportConfig, logger: LoggerConfig | None = None
) -> Path:
    """The MedMNIST study's models x distillation section (:mod:`qtl.report.qvit`)."""
    from qtl.report.qvit import write_qvit_report

    path = write_qvit_report(sweep, out, cfg.alpha, cfg.dpi)
    append_intervals(sweep, out, path, cfg.dpi)
    return path


def append_intervals(sweep: Sweep, out: Path, report: Path, dpi: int) -> None:
    """Add the DeLong intervals (every run; the best run per arm shown) and the ROC curves
    to a section's report.md."""
    table = interval_table(sweep)
    if not table.rows:
        return
    csv_path, _ = table.write(out / "tables")
    rocs = roc_figures(sweep, out / "figures", dpi)
    cols = ["task", "head", "seed", "split", "label", "auroc", "low", "high", "positives"]
    lines = [
        "",
        "## How sure each AUC is",
        "",
        "DeLong 95% intervals over the test images per class (one-vs-rest) or label, for each "
        f"arm's best run (lowest validation loss); every run's: `{csv_path.relative_to(out)}`.",
        "",
        table.where(best_run=True).markdown(cols),
        "",
        *(f"![{p.stem}]({p.relative_to(out)})" for p in rocs),
        "",
    ]
    with report.open("a") as f:
        f.write("\n".join(lines))


def generic_section(
    sweep: Sweep, out: Path, cfg: ReportConfig, logger: LoggerConfig | None = None
) -> Path:
    """Any other study: one row per run with its record's mean score per evaluated split."""
    table = runs_table(sweep)
    table.write(out / "tables")
    path = out / "report.md"
    title = f"# Runs of {sweep.root}"
    path.write_text(f"{title}\n\n{table.markdown()}\n")
    print(f"[qtl] report of {sweep.root}: {len(sweep.finished)} finished run(s) -> {path}")
    return path


Section = Callable[[Sweep, Path, ReportConfig, "LoggerConfig | None"], Path]
# the report section of each study, by the study name its run records carry
SECTIONS: dict[str, Section] = {"cxr": cxr_section, "medmnist": medmnist_section}
