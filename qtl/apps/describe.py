"""``mode=describe``: the model's parameters per component, without allocating weights."""

from __future__ import annotations

from pathlib import Path

from qtl.config import HeadName, QtlConfig, validate


def describe(cfg: QtlConfig) -> list[tuple[str, int]]:
    """Print the parameter table per component (no weights allocated, no training)."""
    from qtl.models.classifier import abstract_model, parameter_table

    rows = parameter_table(abstract_model(cfg), cfg)
    n = len(cfg.task.labels)
    print(
        f"qtl model: task={cfg.task.name} ({n} labels) head={cfg.head.name.value} "
        f"backbone={cfg.backbone.name}"
        + (f" depth={cfg.head.depth} qubits={n}" if cfg.head.name == HeadName.dqc else "")
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'component':<{width}}  {'parameters':>12}")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>12,}")
    return rows


def main(cfg: QtlConfig, run_dir: Path | None = None) -> list[tuple[str, int]]:
    validate(cfg)
    return describe(cfg)
