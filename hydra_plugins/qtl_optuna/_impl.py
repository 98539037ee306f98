"""The search loop of ``hydra/sweeper=qtl_optuna`` (see the package docstring).

The override grammar is hydra-optuna-sweeper's (``_space.py``); the loop is qtl's own,
because that plugin's would, on a reloaded study, number jobs from 0 again (their run
directories collide with the first trials') and run ``n_trials`` more.

How a search continues after a kill:
- one search at a time per sweep folder (a ``flock`` on ``.search.lock``, released by the
  kernel when the process dies), so a trial still RUNNING in storage at start was
  interrupted;
- such a trial is launched again with its own number and parameters, hence in its own run
  directory, where qtl resumes it from its last checkpoint (or just reads results.json if
  it had finished); if the search space changed since, it is told FAIL and marked
  interrupted instead;
- ``n_trials`` is the study's total: trials that ended count (complete, pruned or failed),
  interrupted ones do not; only the missing ones are asked for;
- job number = trial number, so ``hydra.sweep.subdir=trial${hydra.job.num}`` names each
  trial's directory for good;
- a seeded sampler is reseeded with the number of trials already in the study, so a
  resumed search does not replay the first trials' random draws.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from qtl.sweep.objective import finite
from qtl.utils.files import write_json_atomic

from ._space import describe, grid_choices, parse, suggest

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"  # what the search report reads: study name, storage, objective
LOCK_FILE = ".search.lock"
# trial user attributes
OUTCOME = "qtl_outcome"  # complete | diverged | failed | interrupted
RUN_DIR = "qtl_run_dir"  # the trial's run directory, relative to the sweep folder
ERROR = "qtl_error"  # first line of a failed job's error
INTERRUPTED = "qtl_interrupted"  # FAIL because it was interrupted: not counted in n_trials
IDENTITY = "qtl_identity"  # study attribute: the config every trial shares

ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class SearchError(RuntimeError):
    """A search that cannot start or continue; the message says why and what to do."""


def ended_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards ``n_trials``: ended, and not merely interrupted."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=ENDED)
        if not t.user_attrs.get(INTERRUPTED)
    ]


def _first_line(err: Any) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()[:300]


def _holds(config: DictConfig, condition: str, name: str) -> bool:
    """``key=value`` / ``key!=value`` against the composed config (case-insensitive)."""
    negate = "!=" in condition
    key, sep, want = condition.partition("!=" if negate else "=")
    if not sep or not key.strip():
        raise SearchError(
            f"hydra.sweeper.only_when.{name}='{condition}': expected 'key=value' or "
            "'key!=value', e.g. head.name=dqc"
        )
    missing = object()
    actual = OmegaConf.select(config, key.strip(), default=missing)
    if actual is missing:
        raise SearchError(
            f"hydra.sweeper.only_when.{name}='{condition}': '{key.strip()}' is not a config key"
        )
    same = str(actual).lower() == want.strip().lower()
    return same != negate


class QtlOptunaSweeperImpl(Sweeper):
    """An Optuna search whose loop continues a stored study."""

    def __init__(
        self,
        *,
        sampler: DictConfig,
        direction: str | None,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        only_when: DictConfig | dict[str, str] | None,
    ) -> None:
        if n_trials < 1:
            raise SearchError(f"hydra.sweeper.n_trials={n_trials}: expected at least 1")
        if n_jobs < 1:
            raise SearchError(f"hydra.sweeper.n_jobs={n_jobs}: expected at least 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise SearchError(
                f"hydra.sweeper.max_failure_rate={max_failure_rate}: expected a fraction in [0, 1]"
            )
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.only_when = {str(k): str(v) for k, v in (only_when or {}).items()}
        self._lock_handle: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # -- the loop -------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        cfg = self.config
        if str(OmegaConf.select(cfg, "mode", default="train")) != "train":
            raise SearchError(
                f"mode={cfg.mode}: a search trains one run per trial (mode=train); "
                "drop the mode override or hydra/sweeper=qtl_optuna"
            )
        sweep_dir = Path(str(cfg.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._lock(sweep_dir)
        space, fixed, not_searched = self._space(arguments)
        objective = str(OmegaConf.select(cfg, "search.objective", default="val_loss"))
        direction = self._direction(objective)
        storage = self._storage_url()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            directions=[direction],
            load_if_exists=True,
        )
        if study.directions != [StudyDirection[direction.upper()]]:
            raise SearchError(
                f"study '{study.study_name}' in {storage} was created to "
                f"{study.directions[0].name.lower()}, this search would {direction} "
                f"(search.objective={objective}). Use the objective it was started with, "
                "or another hydra.sweep.dir / hydra.sweeper.study_name."
            )
        self._check_identity(study)
        study.sampler = self._sampler(study, space)
        self._write_search_file(sweep_dir, study, storage, objective, direction, fixed)

        resume = self._interrupted(study, space)
        done = len(ended_trials(study))
        budget = max(0, self.n_trials - done)
        resume, to_go = resume[:budget], budget - min(budget, len(resume))
        log.info(
            f"Study '{study.study_name}' ({storage or 'in memory'}): {done} of {self.n_trials} "
            f"trial(s) ended; {len(resume)} interrupted trial(s) to continue, {to_go} new; "
            f"{direction} {objective}; {self.n_jobs} trial(s) per launch"
        )
        log.info("Searching: " + ", ".join(f"{k} ~ {describe(v)}" for k, v in space.items()))
        if not_searched:
            log.info(
                "Not searched for this run: "
                + ", ".join(f"{k} (only when {v})" for k, v in not_searched.items())
            )
        while resume or to_go > 0:
            if resume:
                batch, resume = resume[: self.n_jobs], resume[self.n_jobs :]
                trials = [Trial(study, t._trial_id) for t in batch]
            else:
                n = min(self.n_jobs, to_go)
                trials = [study.ask() for _ in range(n)]
                to_go -= n
            # an interrupted trial keeps the values it has (Trial._suggest reads them back)
            overrides = self._configure_trials(trials, space, fixed)
            returns = self._launch(trials, overrides)
            for trial, ret in zip(trials, returns, strict=True):
                self._tell(study, trial, ret, sweep_dir)
            self._check_failures(study, returns)
        self._finish(study, sweep_dir)

    # -- pieces ---------------------------------------------------------------------------
    def _lock(self, sweep_dir: Path) -> None:
        """One search per folder: a second one would rerun the first one's running trials."""
        handle = (sweep_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise SearchError(
                f"another search is running on {sweep_dir} (pid {holder}); wait for it or "
                "stop it before continuing this one"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle  # held until this process exits

    def _space(
        self, arguments: list[str]
    ) -> tuple[dict[str, BaseDistribution], dict[str, Any], dict[str, str]]:
        """Distributions to search, fixed overrides, and parameters ``only_when`` left out."""
        params_conf = [f"{k!s}={v}" for k, v in (self.params or {}).items()]
        params_conf.extend(arguments)
        space, fixed = parse(params_conf)
        for name in fixed:  # set on the command line: not searched
            space.pop(name, None)
        not_searched: dict[str, str] = {}
        for name, condition in self.only_when.items():
            holds = _holds(self.config, condition, name)
            if name in space and not holds:
                not_searched[name] = condition
                del space[name]
        if not space:
            raise SearchError(
                "nothing to search: hydra.sweeper.params is empty, or every parameter is fixed "
                "on the command line or left out by hydra.sweeper.only_when"
            )
        return space, fixed, not_searched

    def _direction(self, objective: str) -> str:
        from qtl.sweep.objective import direction as objective_direction

        derived = objective_direction(objective)
        if self.direction is None:
            return derived
        given = str(self.direction).lower()
        if given != derived:
            raise SearchError(
                f"hydra.sweeper.direction={given} contradicts search.objective={objective} "
                f"(which is {derived}d); leave hydra.sweeper.direction unset"
            )
        return given

    def _storage_url(self) -> str | None:
        if self.storage is None:
            log.warning(
                "hydra.sweeper.storage is null: the study lives in memory, and an interrupted "
                "search cannot continue (set e.g. sqlite:///${hydra.sweep.dir}/optuna.db)"
            )
            return None
        url = str(self.storage)
        if url.startswith("sqlite:///"):  # SQLite creates the file, not its folder
            Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return url

    def _check_identity(self, study: optuna.Study) -> None:
        """A study holds one config's trials; another config must not continue it."""
        from qtl.config import to_schema
        from qtl.record.identity import identity as _identity

        task_keys = [str(k) for k in self.config if k != "hydra"]
        mine = json.loads(
            json.dumps(_identity(to_schema(OmegaConf.masked_copy(self.config, task_keys))),
                       default=str)
        )  # fmt: skip
        theirs = study.user_attrs.get(IDENTITY)
        if theirs is None:
            study.set_user_attr(IDENTITY, mine)
            return
        if theirs != mine:
            diffs = [
                f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
                for k in sorted(set(theirs) | set(mine))
                if theirs.get(k) != mine.get(k)
            ]
            raise SearchError(
                f"study '{study.study_name}' belongs to a search with a different config "
                f"({'; '.join(diffs[:6])}). Nothing was changed. Rerun it with the same "
                "overrides to continue it, or give this search its own folder (name=... or "
                "hydra.sweep.dir=...)."
            )

    def _sampler(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> Any:
        """The configured sampler; a seeded one is offset by the trials already in the study."""
        conf = self.sampler
        kwargs: dict[str, Any] = {}
        seed = OmegaConf.select(conf, "seed", default=None)
        if seed is not None:
            kwargs["seed"] = int(seed) + len(study.get_trials(deepcopy=False))
        sampler = instantiate(conf, **kwargs)
        if isinstance(sampler, functools.partial):  # GridSampler: needs the space
            grid = {name: grid_choices(name, d) for name, d in space.items()}
            sampler = sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info(f"GridSampler: n_trials is the grid's size at most, {self.n_trials}")
        return sampler

    def _write_search_file(
        self,
        sweep_dir: Path,
        study: optuna.Study,
        storage: str | None,
        objective: str,
        direction: str,
        fixed: dict[str, Any],
    ) -> None:
        """What ``mode=report`` needs to find and describe this search."""
        storage_file = None
        if storage and storage.startswith("sqlite:///"):
            db = Path(storage[len("sqlite:///") :]).expanduser().absolute()
            storage = f"sqlite:///{db}"
            try:
                storage_file = str(db.relative_to(sweep_dir.absolute()))
            except ValueError:
                storage_file = None
        info = {
            "study_name": study.study_name,
            "storage": storage,
            "storage_file": storage_file,  # inside the folder: found again if it is moved
            "objective": objective,
            "direction": direction,
            "n_trials": self.n_trials,
            "fixed_overrides": [f"{k}={v}" for k, v in fixed.items()],
        }
        write_json_atomic(sweep_dir / SEARCH_FILE, info, indent=1)

    def _interrupted(
        self, study: optuna.Study, space: dict[str, BaseDistribution]
    ) -> list[FrozenTrial]:
        """RUNNING trials (stale: we hold the lock): continue them, or fail them if their
        parameters no longer fit the search space."""
        resume = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # killed while its parameters were being drawn: the missing ones are drawn now
            if all(space.get(k) == d for k, d in t.distributions.items()):
                resume.append(t)
                continue
            trial = Trial(study, t._trial_id)
            trial.set_user_attr(INTERRUPTED, True)
            trial.set_user_attr(OUTCOME, "interrupted")
            study.tell(t.number, state=TrialState.FAIL)
            log.warning(
                f"trial {t.number} was interrupted and the search space has changed since: "
                "told FAIL (not counted in n_trials)"
            )
        return sorted(resume, key=lambda t: t.number)

    def _configure_trials(
        self, trials: list[Trial], space: dict[str, BaseDistribution], fixed: dict[str, Any]
    ) -> list[tuple[str, ...]]:
        """Each trial's overrides: its drawn parameters, then the fixed command-line ones.

        A continued trial already holds its parameters: ``suggest`` returns them as stored.
        The fixed overrides are kept as user attributes, so the storage shows the whole run.
        """
        overrides = []
        for trial in trials:
            params = {name: suggest(trial, name, dist) for name, dist in space.items()}
            for name, value in fixed.items():
                trial.set_user_attr(name, value)
            params.update(fixed)
            overrides.append(tuple(f"{name}={value}" for name, value in params.items()))
        return overrides

    def _launch(self, trials: list[Trial], overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
        """Job number = trial number: one launch per run of consecutive numbers."""
        returns: list[JobReturn] = []
        i = 0
        while i < len(trials):
            j = i + 1
            while j < len(trials) and trials[j].number == trials[j - 1].number + 1:
                j += 1
            returns.extend(
                self.launcher.launch(list(overrides[i:j]), initial_job_idx=trials[i].number)
            )
            i = j
        return returns

    def _tell(self, study: optuna.Study, trial: Trial, ret: JobReturn, sweep_dir: Path) -> None:
        """COMPLETE with the objective; PRUNED if the run diverged; FAIL if the job failed."""
        from qtl.sweep.objective import diverged

        run_dir: Path | None = None
        out = None
        if ret.hydra_cfg is not None:
            out = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
        if out is not None:  # a launcher that never started the job cannot know its folder
            run_dir = Path(str(out))
            try:
                shown = os.path.relpath(run_dir.absolute(), sweep_dir.absolute())
            except ValueError:
                shown = str(run_dir)
            trial.set_user_attr(RUN_DIR, shown)
        if ret.status == JobStatus.COMPLETED:
            value = finite(ret._return_value)
            if math.isfinite(value):
                trial.set_user_attr(OUTCOME, "complete")
                study.tell(trial, value)
                log.info(f"trial {trial.number}: {value:.6g}")
                return
            trial.set_user_attr(OUTCOME, "diverged")
            trial.set_user_attr(ERROR, "no finite objective in the run's results.json")
            study.tell(trial, state=TrialState.PRUNED)
            log.warning(f"trial {trial.number}: no finite objective (diverged): PRUNED")
            return
        err = ret._return_value
        trial.set_user_attr(ERROR, _first_line(err))
        if diverged(run_dir, str(err)):
            trial.set_user_attr(OUTCOME, "diverged")
            study.tell(trial, state=TrialState.PRUNED)
            log.warning(f"trial {trial.number}: loss went non-finite (diverged): PRUNED")
            return
        trial.set_user_attr(OUTCOME, "failed")
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number} failed: {_first_line(err)}")

    def _check_failures(self, study: optuna.Study, returns: list[JobReturn]) -> None:
        failed = [t for t in ended_trials(study) if t.state == TrialState.FAIL]
        allowed = self.max_failure_rate * self.n_trials
        if len(failed) <= allowed:
            return
        log.error(
            f"{len(failed)} trial(s) failed, more than hydra.sweeper.max_failure_rate="
            f"{self.max_failure_rate} of {self.n_trials} allows: stopping the search"
        )
        for ret in returns:
            if ret.status == JobStatus.FAILED:
                ret.return_value  # noqa: B018 - raises the job's own error, with its traceback
        raise SearchError(
            f"{len(failed)} trial(s) failed (trials {[t.number for t in failed]}): more than "
            f"hydra.sweeper.max_failure_rate={self.max_failure_rate} allows"
        )

    def _finish(self, study: optuna.Study, sweep_dir: Path) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial completed: no best parameters")
            return
        best = study.best_trial
        log.info(f"Best trial {best.number}: {best.value:.6g} with {best.params}")
        OmegaConf.save(
            OmegaConf.create(
                {"name": "optuna", "best_params": best.params, "best_value": best.value,
                 "best_trial": best.number}
            ),
            sweep_dir / "optimization_results.yaml",
        )  # fmt: skip
