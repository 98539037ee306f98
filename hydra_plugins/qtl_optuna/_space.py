"""Hydra sweep overrides -> Optuna distributions, and asking a trial for them.

The grammar is the one the released hydra-optuna-sweeper 1.3 accepted (``choice(a, b)``,
``range(1, 8, 2)``, ``interval(0.1, 1)``, ``tag(log, interval(1e-5, 1e-2))``), so existing
search configs keep working; the mapping is ported from that plugin (MIT, Copyright (c)
Facebook, Inc. and its affiliates) and written for Optuna >= 4, whose distributions are
``FloatDistribution`` / ``IntDistribution`` / ``CategoricalDistribution``. That release
supports Optuna < 3 only, so qtl owns these few functions rather than depend on it.
"""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

_CHOICE_TYPES = (str, int, float, bool, type(None))


def _choices(override: Override) -> CategoricalDistribution:
    choices = []
    for x in override.sweep_iterator(transformer=Transformer.encode):
        if not isinstance(x, _CHOICE_TYPES):
            raise ValueError(
                f"hydra.sweeper.params.{override.get_key_element()}: a choice must be str, int, "
                f"float, bool or null, got {type(x).__name__}"
            )
        choices.append(x)
    return CategoricalDistribution(choices)


def distribution(override: Override) -> BaseDistribution | str:
    """One parsed override: a distribution if it sweeps, else its value (a fixed override)."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        return _choices(override)
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        assert value.start is not None and value.stop is not None
        if value.shuffle:
            return _choices(override)
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        assert value.start is not None and value.end is not None
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise ValueError(
        f"hydra.sweeper.params.{override.get_key_element()}={override.get_value_element_as_str()}"
        ": expected choice(...), range(...), interval(...) or tag(log, interval(...))"
    )


def parse(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
    """``key=sweep`` overrides -> (search space, fixed ``key=value`` overrides)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        value = distribution(override)
        if isinstance(value, BaseDistribution):
            space[override.get_key_element()] = value
        else:
            fixed[override.get_key_element()] = value
    return space, fixed


def suggest(trial: Trial, name: str, dist: BaseDistribution) -> Any:
    """Ask ``trial`` for ``name`` from ``dist``; a trial that already has it returns its value."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise ValueError(f"{name}: unsupported distribution {dist!r}")


def grid_choices(name: str, dist: BaseDistribution) -> list[Any]:
    """The values GridSampler walks for one parameter (ends included)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    step = getattr(dist, "step", None)
    if isinstance(dist, IntDistribution | FloatDistribution) and step and not dist.log:
        n = math.floor((dist.high - dist.low) / step + 1e-9) + 1
        return [dist.low + i * step for i in range(n)]
    raise ValueError(
        f"hydra.sweeper.params.{name}: GridSampler needs discrete values "
        "(choice(...) or range(...)), not a continuous interval"
    )


def describe(dist: BaseDistribution) -> str:
    """A distribution as a reader would write it: ``log-uniform [1e-05, 0.01]``."""
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    low, high = getattr(dist, "low", "?"), getattr(dist, "high", "?")
    kind = "int " if isinstance(dist, IntDistribution) else ""
    step = getattr(dist, "step", None)
    every = f" step {step:g}" if step and not (kind and step == 1) else ""
    scale = "log-uniform" if getattr(dist, "log", False) else "uniform"
    return f"{kind}{scale} [{low:g}, {high:g}]{every}"
