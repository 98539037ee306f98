"""The knowledge-distillation teacher of a MedMNIST run (a run of the trainer, like
``qtl.studies.pretrain``): ``distill.teacher`` names a preset (``resnet18``), trained here once
on the student's data as an ordinary qtl run and shared by every student, or the folder of a
finished run. Its logits per split are cached by ``qtl.train.teacher``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf

from qtl.config import (
    ConfigError,
    DistillConfig,
    DistillMode,
    LoggerConfig,
    Mode,
    ModelConfig,
    ModelName,
    QtlConfig,
    to_schema,
)
from qtl.studies.base import Study
from qtl.utils import paths
from qtl.utils.files import file_lock

PRESETS = {"resnet18": ModelName.resnet18, "vit": ModelName.vit, "qvit": ModelName.qvit}


def teacher_config(cfg: QtlConfig) -> QtlConfig:
    """The preset teacher's run: the student's data and training recipe (its epochs
    ``distill.teacher_epochs`` when set), the preset model (the student's ``model.cnn_*``
    shape for resnet18), no distillation, its own seed."""
    preset = cfg.distill.teacher
    t = copy.deepcopy(cfg)
    t.mode = Mode.train
    t.name = "teacher"
    t.seed = cfg.distill.teacher_seed
    t.model = ModelConfig(
        name=PRESETS[preset],
        cnn_stem=cfg.model.cnn_stem,
        cnn_widths=list(cfg.model.cnn_widths),
        cnn_depths=list(cfg.model.cnn_depths),
    )
    if t.model.name == ModelName.qvit:
        t.model.quantum = ["q", "k", "v", "o", "mlp"]
    if cfg.distill.teacher_epochs is not None:
        t.train.max_epochs = cfg.distill.teacher_epochs
        t.train.patience = min(t.train.patience, cfg.distill.teacher_epochs)
    t.distill = DistillConfig()
    t.logger = LoggerConfig()
    return t


def preset_teacher_dir(cfg: QtlConfig, study: Study) -> tuple[QtlConfig, Path]:
    """The preset teacher's config and its run folder, keyed by its fingerprint over the
    study's identity fields and the data's content (not its path: the data may move). A
    folder written by an earlier qtl is reused when it holds a finished teacher: keyed by
    the study's fields with the data's path (record version 3), or by every schema field,
    CXR ones included (version 2)."""
    from qtl.record.files import RunFiles
    from qtl.record.identity import fingerprint

    t = teacher_config(cfg)
    root = paths.pretrained_dir(cfg.paths)
    prefix = f"teacher-{cfg.data.flag}-{cfg.distill.teacher}"
    run_dir = root / f"{prefix}-{fingerprint(t, study)}" / "run"
    if run_dir.parent.exists():
        return t, run_dir
    for key in (fingerprint(t, study, by_path=True), fingerprint(t)):
        legacy = root / f"{prefix}-{key}" / "run"
        if RunFiles(legacy, create=False).read_results() is not None:
            return t, legacy
    return t, run_dir


def resolve_teacher(cfg: QtlConfig, study: Study):  # -> TeacherLogits | None
    """The teacher's logits for ``cfg`` (None without distillation); a preset teacher is
    trained first (a run of ``study``) when it is not there yet (one process at a time: a
    file lock)."""
    if cfg.distill.mode == DistillMode.none:
        return None
    from qtl.record.files import RunFiles
    from qtl.train.driver import train_and_evaluate
    from qtl.train.teacher import teacher_logits

    if cfg.distill.teacher in PRESETS:
        tcfg, run_dir = preset_teacher_dir(cfg, study)
        if RunFiles(run_dir, create=False).read_results() is None:
            with file_lock(run_dir.parent.with_suffix(".lock")):
                print(f"[qtl] distill: training the teacher ({cfg.distill.teacher}) in {run_dir}")
                train_and_evaluate(tcfg, run_dir, study)
    else:
        run_dir = Path(cfg.distill.teacher)
        saved = RunFiles(run_dir, create=False).read_results()
        if saved is None:
            raise ConfigError(
                f"distill.teacher={cfg.distill.teacher}: neither a preset "
                f"({', '.join(PRESETS)}) nor a finished run folder (no results.json there)."
            )
        tcfg = to_schema(OmegaConf.create(saved.config))
        tcfg.paths = cfg.paths
    return teacher_logits(cfg, tcfg, run_dir, paths.cache_dir(cfg.paths))
