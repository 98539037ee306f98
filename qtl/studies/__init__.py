"""The studies qtl runs, one module each, and the one place a run's study is chosen.

``study_for(cfg)``: the config's ``study`` when set (a registered name), else the study whose
``data_names`` hold ``data.name`` (data=synthetic | nih_cxr_lt: cxr; data=medmnist: medmnist),
unless ``model`` is another study's own (model=qvit: medmnist), which then decides.
A new study is a :class:`~qtl.studies.base.Study` subclass passed to :func:`register`.
"""

from __future__ import annotations

from typing import Any

from qtl.config import ConfigError
from qtl.config import register_configs as _register_schema
from qtl.studies.base import Study, schema_default
from qtl.studies.cxr import CxrStudy
from qtl.studies.medmnist import MedmnistStudy

_STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Make ``study`` selectable (``study=<name>``, or by its ``data_names``)."""
    _STUDIES[study.name] = study
    return study


register(CxrStudy())
register(MedmnistStudy())


def get(name: str) -> Study:
    """The registered study called ``name`` (a run record's ``study``)."""
    try:
        return _STUDIES[name]
    except KeyError:
        raise ConfigError(
            f"study={name!r} is not a registered study ({', '.join(sorted(_STUDIES))})"
        ) from None


def study_for(cfg: Any) -> Study:
    """The study of a config (typed or the composed DictConfig): chosen here, once per run."""
    name = cfg.get("study") if hasattr(cfg, "get") else getattr(cfg, "study", None)
    if name:
        return get(str(name))
    data, model = str(cfg.data.name), str(cfg.model.name)
    by_data = next((s for s in _STUDIES.values() if data in s.data_names), None)
    chosen = model != str(schema_default("model.name"))  # not the default model
    if by_data is None or (chosen and model not in by_data.model_names):
        # a model of another study (model=qvit with data=synthetic): that study's run, so
        # its checks name what does not fit (the data, a field of the other study)
        by_model = next((s for s in _STUDIES.values() if model in s.model_names), None)
        if by_model is not None:
            return by_model
    if by_data is None:
        raise ConfigError(f"data={data}: no study reads it; set study=<one of {sorted(_STUDIES)}>")
    return by_data


def run_subdir(cfg: Any) -> str:
    """A training run's folder under its experiment: ``<study's run label>/seed<seed>``.
    Deterministic, so the same command finds (and resumes) the same run."""
    return f"{study_for(cfg).run_label(cfg)}/seed{cfg.seed}"


def register_configs() -> None:
    """The schema for ``conf/config.yaml`` and the run-dir resolvers (the study's run label)."""
    _register_schema(run_subdir)
