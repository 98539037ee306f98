"""A search trial's objective, read from the run's record (``results.json``).

The objective is a *validation* number - selecting hyper-parameters on the test split would
leak it into the result. ``val_loss`` is the best validation loss, the quantity early
stopping already minimises; ``val_auroc`` is the validation mean AUROC of that same best
checkpoint (the model the run keeps), maximised.

A run that produced no usable number - its loss went to NaN/inf (diverged), or its record
lacks the metric - gives NaN here; qtl's Optuna sweeper then tells the trial PRUNED
(diverged) instead of handing Optuna a value it would reject.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qtl.config import SearchConfig, SearchObjective
from qtl.record.files import RecordError, Results, RunFiles


def direction(objective: SearchObjective | str) -> str:
    """Optuna's direction for an objective name (``minimize`` or ``maximize``)."""
    return SearchConfig(objective=SearchObjective(str(objective))).direction


def finite(value: Any) -> float:
    """``value`` as a float, NaN when it is missing, not a number or infinite."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def objective_value(results: Results, objective: SearchObjective | str) -> float:
    """The objective from a run's record; NaN if unusable."""
    objective = SearchObjective(str(objective))
    if objective == SearchObjective.val_loss:
        return finite(results.best_val_loss)
    return finite(results.mean_auroc("val"))


def read_objective(run_dir: Path | str, objective: SearchObjective | str) -> float:
    """The objective of the run in ``run_dir``; NaN when it has no (readable) results.json."""
    try:
        results = RunFiles(Path(run_dir), create=False).read_results()
    except RecordError:
        return math.nan
    return math.nan if results is None else objective_value(results, objective)


# What a failed job's error says when the model's outputs went non-finite: the metric code
# (scikit-learn) refuses NaN/inf predictions before the epoch is recorded.
_NONFINITE_ERRORS = ("input contains nan", "input contains infinity", "training diverged")


def diverged(run_dir: Path | str | None, error: str | None = None) -> bool:
    """Whether a run diverged: a non-finite loss in its recorded epochs, or a failure whose
    error is about non-finite model outputs."""
    if error is not None and any(e in error.lower() for e in _NONFINITE_ERRORS):
        return True
    if run_dir is None:
        return False
    files = RunFiles(Path(run_dir), create=False)
    failure = files.read_failure()  # the trainer's own record of a non-finite stop
    if failure is not None and failure.reason == "non_finite":
        return True
    rows = files.read_metrics()
    return any(math.isnan(finite(r.train_loss)) or math.isnan(finite(r.val_loss)) for r in rows)


def job_return(result: Any, search: SearchConfig) -> float | None:
    """What a finished training job returns to the sweeper: its objective (NaN if unusable).

    Plain sweeps ignore it; the Optuna sweeper optimises it.
    """
    if not isinstance(result, dict):
        return None
    return objective_value(Results.from_json(result), search.objective)
