"""``hydra/sweeper=qtl_optuna``: the config schema and the (lightweight) sweeper class.

Hydra imports this module on every start (plugin scan); Optuna is only imported when a
search runs (``_impl.py``).
"""
# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is
# in sys.modules, and dataclasses then cannot resolve string annotations.

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


# Samplers (hydra/sweeper/sampler=<name>): Optuna's constructors with the arguments whose
# meaning and default are the same in Optuna 4 and 5 (the rest keep Optuna's defaults);
# `seed` is offset on a resumed study (_impl.py).
@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10  # random trials before the model is used
    n_ei_candidates: int = 24


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):  # needs the `cmaes` package
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"  # sobol | halton
    scramble: bool = False


@dataclass
class GridSamplerConfig(SamplerConfig):
    # built once the search space is known (every value of each choice/range, n_trials capped)
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


SAMPLERS = {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "qmc": QMCSamplerConfig,
    "grid": GridSamplerConfig,
}


@dataclass
class QtlOptunaSweeperConf:
    _target_: str = "hydra_plugins.qtl_optuna.optuna_sweeper.QtlOptunaSweeper"
    # the sampler stays a config until the study is loaded: a resumed study reseeds it
    _recursive_: bool = False
    # hydra/sweeper/sampler=tpe | random | cmaes | nsgaii | qmc | grid
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: SamplerConfig = MISSING
    # minimize | maximize; null = from search.objective (val_loss: minimize, val_auroc: maximize)
    direction: str | None = None
    # where the study lives, e.g. sqlite:///${hydra.sweep.dir}/optuna.db; null = in memory
    # (nothing to continue from after an interruption)
    storage: str | None = None
    study_name: str | None = None
    # the study's total: trials that ended (complete, pruned or failed) count, interrupted
    # ones do not; rerunning a search runs only what is missing
    n_trials: int = 20
    # trials handed to the launcher at once (the launcher decides how many run in parallel)
    n_jobs: int = 1
    # fraction of n_trials that may fail (crash) before the search stops with the error
    max_failure_rate: float = 0.0
    # search space, Hydra override syntax: {train.lr: "tag(log, interval(1e-5, 1e-2))"}
    params: dict[str, str] | None = None
    # a parameter searched only when the run's config matches, e.g.
    # {head.depth: "head.name=dqc", train.backbone_lr: "backbone.freeze=false"}; != also works
    only_when: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="qtl_optuna", node=QtlOptunaSweeperConf, provider="qtl"
)
for _name, _node in SAMPLERS.items():
    ConfigStore.instance().store(
        group="hydra/sweeper/sampler", name=_name, node=_node, provider="qtl"
    )


class QtlOptunaSweeper(Sweeper):
    """Optuna search over ``params`` whose study continues where an interrupted one stopped."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: str | None,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        only_when: DictConfig | None = None,
    ) -> None:
        import logging

        # importing optuna loads alembic, whose plugin set-up logs at INFO (Hydra shows INFO)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from ._impl import QtlOptunaSweeperImpl

        self.sweeper = QtlOptunaSweeperImpl(
            sampler=sampler,
            direction=direction,
            storage=storage,
            study_name=study_name,
            n_trials=n_trials,
            n_jobs=n_jobs,
            max_failure_rate=max_failure_rate,
            params=params,
            only_when=only_when,
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
