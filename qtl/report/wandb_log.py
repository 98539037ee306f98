"""The report as one W&B run per sweep: the tables as W&B tables, the figures as images.

The run lives in ``<report>/wandb/`` (offline run files without an API key, like the
training runs) and its id is kept in ``<report>/wandb_run_id``, so re-rendering the report
updates the same summary run instead of adding another.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

from qtl.config import WandbConfig
from qtl.record.loggers import _wandb_mode
from qtl.report.collect import Sweep
from qtl.report.synthetic import synthetic_runs
from qtl.report.tables import Table


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def log_report(
    cfg: WandbConfig, sweep: Sweep, out: Path, tables: dict[str, Table], figures: dict
) -> str:
    """Log tables, figures and the headline numbers; returns the W&B run id."""
    import wandb

    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    name = sweep.root.name
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=name,
        job_type="report",
        name=f"{name}/report",
        tags=["report", *cfg.tags, *(["synthetic"] if synthetic_runs(sweep)[0] else [])],
        config={
            "sweep": str(sweep.root),
            "runs": len(sweep.runs),
            "finished": len(sweep.finished),
            "failed": len(sweep.failed),
            "missing": len(sweep.missing),
        },
        dir=str(out),
        id=run_id,
        resume="allow",
        mode=_wandb_mode(cfg.mode),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        data: dict[str, Any] = {
            f"table/{key}": wandb.Table(
                columns=t.columns, data=[[_cell(r.get(c)) for c in t.columns] for r in t.rows]
            )
            for key, t in tables.items()
        }
        data |= {f"figure/{p.stem}": wandb.Image(str(p)) for ps in figures.values() for p in ps}
        run.log(data)
        for row in tables["comparison"].rows:
            if row["label"] == "mean AUROC":
                key = f"{row['task']}/{row['test_set'].replace(' ', '_')}"
                for col in ("cdl", "dqc", "pct_diff", "p", "n_pairs"):
                    run.summary[f"{key}/{col}"] = _cell(row[col])
    finally:
        run.finish()
    return run_id
