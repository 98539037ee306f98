"""The ``Study`` interface: everything that differs between the studies qtl runs.

A study owns its fields' checks, what defines a run (identity), what a run trains on (data,
model, objective), the fields it adds to the run record, the run's label (its folder and W&B
group), ``mode=describe``'s table. Its section of a sweep's report is found by the study name
its run records carry (``qtl.report.build.SECTIONS``; the per-run table for a study without
one), as the report sits above this layer. The driver, loop,
checkpoints, identity, loggers and report take a ``Study`` and never ask which one it is; the
study is chosen once from the config (:func:`qtl.studies.study_for`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qtl.config import ConfigError, QtlConfig

if TYPE_CHECKING:
    from qtl.record.schema import Results
    from qtl.train.driver import RunInputs


@dataclasses.dataclass
class Predictable:
    """A run's model as ``mode=predict`` and ``mode=export`` need it (``Study.predictable``):
    its structure (weights come from the run's best checkpoint or an export), how images are
    prepared for it and what its outputs are."""

    model: Any  # the run's nnx module, freshly initialised (its weights are replaced)
    objective: Any  # normalize(uint8-valued images) -> model input; scores(logits) -> probs
    outputs: list[str]  # one name per probability column (a label, or a class)
    descriptions: list[str]  # what each output means (the label or class name)
    preprocessing: dict[str, Any]  # qtl.data.images.read_image's spec, plus the model input
    task: str  # multi-label | multi-class | binary | ordinal
    # features.cache runs: the checkpoint holds the head alone; the frozen backbone's weights
    # are these (a folder or hub id, as the run started from)
    backbone_weights: str | None = None


@dataclasses.dataclass
class CardFacts:
    """What an export's model card says of the model (``Study.card_facts``)."""

    what: str  # one line: architecture, task, circuit size
    dataset: str  # the real dataset's name, said when the run used real data
    circuit: dict[str, Any] | None  # the recorded options of its circuit; None: classical


def schema_default(key: str) -> Any:
    """The schema's default of a dotted field (``backbone.freeze``); MISSING when it has none."""
    cls: Any = QtlConfig
    *groups, name = key.split(".")
    for group in groups:
        cls = {f.name: f for f in dataclasses.fields(cls)}[group].type
        cls = cls if isinstance(cls, type) else _resolve(cls)
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _resolve(name: str) -> type:
    import qtl.config as config

    return getattr(config, name)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


class Study(ABC):
    """One study: subclass it, set the class fields, implement the methods (see module doc)."""

    name: ClassVar[str]  # the record's ``study`` and the ``study=`` config value
    data_names: ClassVar[tuple[str, ...]] = ()  # data=<name> values that select it by default
    model_names: ClassVar[tuple[str, ...]] = ()  # model=<name> values that are its own
    # dotted fields that belong to another study: set away from their schema default, a run
    # of this study refuses them (they would act silently or not at all)
    foreign: ClassVar[tuple[str, ...]] = ()
    # flat identity keys (or prefixes ending in ".") that do not define this study's runs
    not_identity: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ config and identity

    def validate(self, cfg: QtlConfig) -> None:
        """This study's own cross-field checks (the shared ones ran already); refuses the
        other study's fields with a one-line error naming the field and the study."""
        for key in self.foreign:
            value, default = _get(cfg, key), schema_default(key)
            if value != default:
                shown = str(value).lower() if isinstance(value, bool) else value
                shown = getattr(shown, "value", shown)
                raise ConfigError(
                    f"{key}={shown} has no meaning in the {self.name} study (this run's "
                    f"study, from data={cfg.data.name}); remove it (default {default!r})."
                )
        wires = {
            "head": len(cfg.task.labels) if isinstance(cfg.task.labels, list) else 0,
            "model.circuit": max(cfg.model.hidden_size, cfg.model.mlp_size),  # the widest layer
        }
        for where, opts in (("head", cfg.head), ("model.circuit", cfg.model.circuit)):
            if opts.noise.device_model is not None:
                # imported only here: it loads PennyLane (~2 s), which a classical run never needs
                from qtl.quantum.noise.device_models import check_device_model

                name = opts.noise.device_model
                check_device_model(name, f"{where}.noise.device_model", wires[where])

    def identity_keys(self, keys: list[str]) -> list[str]:
        """Which of the schema's flat identity keys define a run of this study."""

        def dropped(key: str) -> bool:
            return any(
                key == p or (p.endswith(".") and key.startswith(p)) for p in self.not_identity
            )

        return [k for k in keys if not dropped(k)]

    def data_content(self, cfg: QtlConfig) -> dict[str, str]:
        """The data's identity by content (``data.content.<part>`` in the run's identity):
        digests of its label files and image set (:mod:`qtl.data.content`), so the data's
        paths may change. Empty: the data is defined by identity fields alone (a generator's
        settings)."""
        return {}

    # ---------------------------------------------------------------------- the run

    @abstractmethod
    def run_label(self, cfg: Any) -> str:
        """The run's folder under its experiment, before ``/seed<n>``; also its W&B group.
        ``cfg`` may be the composed DictConfig (Hydra's run-dir resolver calls this)."""

    def wandb_tags(self, cfg: QtlConfig) -> list[str]:
        """W&B tags (the config's extra tags are added by the logger)."""
        return [*self.run_label(cfg).split("-"), f"seed{cfg.seed}"]

    def start(self, cfg: QtlConfig) -> dict[str, Any]:
        """What the run starts from, resolved by the application before training (pretrained
        weights, a teacher's logits): keyword arguments of :meth:`inputs`."""
        return {}

    @abstractmethod
    def inputs(self, cfg: QtlConfig, run_dir: Path, show: bool, **start: Any) -> RunInputs:
        """Splits, model, objective and the study's record fields of one run."""

    def provenance(self, cfg: QtlConfig, **start: Any) -> dict[str, Any]:
        """What the run's weights start from (recorded in run_config.json)."""
        return {"source": None, "kind": "random_init", "seed": cfg.seed}

    def predictable(self, cfg: QtlConfig) -> Predictable:
        """The run's model for prediction and export (see :class:`Predictable`)."""
        raise ConfigError(f"the {self.name} study does not support mode=predict or mode=export")

    def card_facts(self, results: Results, outputs: list[str], task: str) -> CardFacts:
        """What an export's model card says of the model: a one-line description, the dataset's
        name and the options of its circuit (None for a classical model)."""
        data = results.config.get("data", {})
        return CardFacts(f"{results.label or results.run} ({len(outputs)} outputs, {task})",
                         str(data.get("name")), None)  # fmt: skip

    @abstractmethod
    def format_scores(self, results: Results) -> str:
        """The finished run's scores as printed at its end."""

    # ----------------------------------------------------------------------- describe

    @abstractmethod
    def describe(self, cfg: QtlConfig) -> list[tuple[str, int]]:
        """``mode=describe``: print the parameter table (and costs); return its rows."""
