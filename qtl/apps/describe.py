"""``mode=describe``: the model's parameters per component, without allocating weights."""

from __future__ import annotations

from pathlib import Path

from qtl.config import DataName, HeadName, QtlConfig, validate


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


def describe_medmnist(cfg: QtlConfig) -> list[tuple[str, int]]:
    """``model=vit | qvit | resnet18`` on ``data.flag``: parameters per component (from the
    built module's shapes), the per-image forward costs with classical FLOPs and quantum gates
    apart, and the QViT / parameter-matched ViT / equal-dims ViT / teacher comparison that the
    paper's "fewer parameters, fewer GFLOPs" claims are checked with."""
    from dataclasses import replace

    from qtl.data.medmnist_info import flag_info
    from qtl.models.medmnist_model import (
        abstract_medmnist_model,
        medmnist_costs,
        medmnist_parameter_table,
    )
    from qtl.models.vit_config import PROJECTIONS, vit_config
    from qtl.models.vit_costs import describe_pair, format_costs, resolve, vit_costs
    from qtl.train.medmnist import check_model
    from qtl.train.objectives import n_outputs

    info = flag_info(cfg.data.flag)
    check_model(cfg, info)
    shape = (cfg.data.size, cfg.data.size, info.channels)
    outputs = n_outputs(info, cfg.data.binary_logits)
    rows = medmnist_parameter_table(abstract_medmnist_model(cfg.model, shape, outputs), cfg.model)
    print(
        f"qtl model: model={cfg.model.name} data.flag={cfg.data.flag} ({info.task.value}, "
        f"{outputs} outputs) image {shape[0]}x{shape[1]}x{shape[2]}"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'component':<{width}}  {'parameters':>12}")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>12,}")
    teacher_model = replace(cfg.model, name="resnet18")
    teacher = medmnist_costs(teacher_model, shape, outputs)["total"]
    if str(cfg.model.name) == "resnet18":
        print(f"per image: {teacher['flops'] / 1e9:.4f} GFLOPs (XLA's count of one forward pass)")
        return rows
    vit = resolve(vit_config(cfg.model), shape, outputs)
    print()
    print(
        format_costs(
            f"{cfg.model.name} per image, one forward pass", vit_costs(vit, shape, outputs)
        )
    )
    base = vit_config(cfg.model)
    quantum = list(base.quantum or base.match_params_of or PROJECTIONS)
    qvit = replace(base, name="qvit", quantum=quantum, match_params_of=None)
    matched = replace(base, name="vit", quantum=[], match_params_of=quantum)
    text, _ = describe_pair(qvit, matched, shape, outputs, teacher=teacher)
    print("\nQViT vs ViT (parameter-matched) vs teacher (ResNet-18):")
    print(text)
    return rows


def main(cfg: QtlConfig, run_dir: Path | None = None) -> list[tuple[str, int]]:
    validate(cfg)
    if cfg.data.name == DataName.medmnist:
        return describe_medmnist(cfg)
    return describe(cfg)
