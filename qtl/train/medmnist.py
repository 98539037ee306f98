"""What a MedMNIST run trains on: the checked .npz splits, the model of the ``model`` group
and the task type's objective, with a teacher's cached logits for distillation.

The arrays go to the same loop as the CXR study's: uint8 (N, H, W, C) images and float32
targets (N, L) - for distillation (N, L + K), the teacher's K logits after the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtl.config import ConfigError, DistillMode, QtlConfig
from qtl.data.medmnist_info import FlagInfo, Task
from qtl.train.objectives import TaskObjective, n_outputs


@dataclass
class TeacherLogits:
    """A trained teacher's logits per split (cached once) and what identifies it."""

    logits: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)  # run dir, checkpoint hash, scores


def label_names(info: FlagInfo) -> list[str]:
    """The label columns of the predictions file."""
    if info.task == Task.multi_label:
        return [f"label_{i}" for i in range(info.n_classes)]
    return ["label"]


def score_names(info: FlagInfo, outputs: int) -> list[str]:
    """The score columns: one per label (multi-label), class, or the positive class."""
    if info.task == Task.multi_label:
        return [f"label_{i}" for i in range(outputs)]
    if info.task == Task.binary and outputs == 1:
        return ["class_1"]
    return [f"class_{i}" for i in range(outputs)]


def check_model(cfg: QtlConfig, info: FlagInfo) -> None:
    """The model group's fields against this dataset, as ConfigErrors (before any work)."""
    from qtl.models.vit import num_tokens
    from qtl.models.vit_config import validate_vit, vit_config

    if str(cfg.model.name) == "resnet18":
        return
    try:
        validate_vit(vit_config(cfg.model))
        num_tokens((cfg.data.size, cfg.data.size, info.channels), cfg.model.patch_size)
    except ValueError as err:
        raise ConfigError(f"{err} (model={cfg.model.name}, data.flag={cfg.data.flag})") from None


def open_data(cfg: QtlConfig, data_dir: Path | None) -> Any:
    """The checked file of ``data.flag`` / ``data.size`` (the synthetic one written if absent)."""
    from qtl.data.medmnist import medmnist_config, open_medmnist
    from qtl.data.medmnist_info import FLAGS

    if cfg.data.flag not in FLAGS:
        raise ConfigError(
            f"data.flag='{cfg.data.flag}' is not a MedMNIST 2D set: {', '.join(FLAGS)}"
        )
    return open_medmnist(medmnist_config(cfg.data, data_dir))


def objective(cfg: QtlConfig, info: FlagInfo, n_train: int) -> TaskObjective:
    """The task type's loss, with the KD term of ``distill`` (pretrain: KD for its epochs)."""
    d = cfg.distill
    batches = -(-n_train // cfg.train.batch_size)
    return TaskObjective(
        task=info.task,
        n_labels=info.label_columns,
        distill=str(d.mode),
        temperature=float(d.temperature),
        alpha=float(d.alpha),
        kd_steps=int(d.pretrain_epochs) * batches if d.mode == DistillMode.pretrain else 0,
    )


@dataclass
class MedMNISTInputs:
    """Everything the driver needs from the data and the model group."""

    info: FlagInfo
    model: Any
    table: list[tuple[str, int]]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]  # what the loop trains/validates on
    labels: dict[str, np.ndarray]  # per split, the labels alone (N, L)
    ids: dict[str, list[str]]
    objective: TaskObjective
    outputs: int
    costs: dict[str, Any]
    synthetic: dict | None


def medmnist_inputs(
    cfg: QtlConfig, data_dir: Path | None, teacher: TeacherLogits | None
) -> MedMNISTInputs:
    """Read the data, build the seeded model, and attach the teacher's logits for KD."""
    from qtl.models.medmnist_model import (
        build_medmnist_model,
        medmnist_costs,
        medmnist_parameter_table,
    )

    data = open_data(cfg, data_dir)
    info = data.info
    check_model(cfg, info)
    outputs = n_outputs(info, cfg.data.binary_logits)
    model = build_medmnist_model(cfg.model, data.image_shape, outputs, cfg.seed)
    table = medmnist_parameter_table(model, cfg.model)
    limit = cfg.data.limit
    arrays, labels, ids = {}, {}, {}
    for name, split in data.splits.items():
        x, y = split.images[:limit], split.labels[:limit].astype(np.float32)
        labels[name], ids[name] = y, [f"{name}_{i}" for i in range(len(x))]
        arrays[name] = (x, y)
    if cfg.distill.mode != DistillMode.none:
        if teacher is None:
            raise ConfigError(
                f"distill={cfg.distill.mode} needs the teacher's logits: train through "
                "qtl.apps.train (it trains or loads distill.teacher and caches its logits)."
            )
        t = teacher.logits["train"][:limit]
        if t.shape != (len(arrays["train"][0]), outputs):
            raise ConfigError(
                f"distill.teacher={cfg.distill.teacher}: its train logits have shape {t.shape}, "
                f"the student needs ({len(arrays['train'][0])}, {outputs}) for {info.flag} "
                "(a teacher trained on other data or with another data.binary_logits?)"
            )
        x, y = arrays["train"]
        arrays["train"] = (x, np.concatenate([y, t.astype(np.float32)], axis=1))
    return MedMNISTInputs(
        info=info,
        model=model,
        table=table,
        arrays=arrays,
        labels=labels,
        ids=ids,
        objective=objective(cfg, info, len(arrays["train"][0])),
        outputs=outputs,
        costs=medmnist_costs(cfg.model, data.image_shape, outputs),
        synthetic=data.synthetic,
    )
