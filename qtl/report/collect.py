"""Read a sweep directory's run records into one in-memory table.

A sweep is whatever ``launch.py -m`` wrote under ``multirun/<name>``: one directory per job
(``<task>-<head>/seed<seed>``). Only the files a run writes are used (results.json,
metrics.jsonl, run_config.json, Hydra's ``.hydra/``), so the report can be rebuilt anywhere
the directory is copied to. A job directory without results.json is a failed run (it has
failed.json, written when training diverged, or the sweep's job_error.txt) or an unfinished
one (killed, still running or requeued); a (task, head, seed) that the rest of the grid
implies but that has no directory at all is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtl.config import ConfigError
from qtl.labels import LABEL_COUNTS
from qtl.record.files import FAILED, EpochRow, RecordError, Results, RunFiles

# Evaluated splits that are test sets, in report order, with their display names.
TEST_SETS: dict[str, str] = {"test": "internal test", "external": "external test"}
_LABEL_DIR = re.compile(r"^(?P<label>[^/]+-[^/]+)/seed(?P<seed>-?\d+)$")
_SUBDIR = re.compile(r"^(?P<task>[^/]+)-(?P<head>[^/-]+)/seed(?P<seed>-?\d+)$")


class ReportError(ConfigError):
    """The sweep directory cannot be reported on; the message says what was found."""


@dataclass
class Run:
    """One job of the sweep and what it left behind."""

    task: str
    head: str
    seed: int
    dir: Path
    results: Results | None = None  # results.json; None = failed or unfinished
    study: str = "cxr"  # the run record's study (qtl.studies): which report section it is in
    history: list[EpochRow] = field(default_factory=list)  # metrics.jsonl rows
    problem: str = ""  # why there is no result, for report.md
    failed_run: bool = False  # a recorded failure (failed.json, job_error.txt), not a kill

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def status(self) -> str:
        """finished | failed (recorded why) | unfinished (killed, running or requeued)."""
        if self.finished:
            return "finished"
        return "failed" if self.failed_run else "unfinished"

    def auroc(self, split: str, label: str | None = None) -> float | None:
        """Mean AUROC (label=None) or one label's AUROC on a split; None if not evaluated."""
        block = self.results.auroc.get(split) if self.results else None
        if block is None:
            return None
        value = block.mean if label is None else block.per_label.get(label)
        return None if value is None else float(value)


@dataclass
class Sweep:
    """All runs found under one sweep directory."""

    root: Path
    runs: list[Run]
    missing: list[tuple[str, str, int]]  # (task, head, seed) implied by the grid, no directory

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]

    def of_study(self, name: str) -> Sweep:
        """The part of the sweep whose records name study ``name`` (its report section)."""
        by_study: dict[str, list[Run]] = {}
        for r in self.runs:
            by_study.setdefault(r.study, []).append(r)
        runs = by_study.get(name, [])
        keys = {(r.task, r.head) for r in runs}
        missing = [m for m in self.missing if (m[0], m[1]) in keys]
        return Sweep(root=self.root, runs=runs, missing=missing)

    @property
    def studies(self) -> list[str]:
        """The studies of the sweep's runs, in order of first appearance."""
        return list(dict.fromkeys(r.study for r in self.runs))

    @property
    def tasks(self) -> list[str]:
        return sorted({r.task for r in self.runs}, key=_task_key)

    def heads(self, task: str | None = None) -> list[str]:
        """Heads in report order: cdl first (the study's reference), then the others."""
        names = {r.head for r in self.runs if task is None or r.task == task}
        return sorted(names, key=lambda h: (h != "cdl", h))

    def seeds(self, task: str) -> list[int]:
        return sorted({r.seed for r in self.runs if r.task == task})

    def get(self, task: str, head: str, seed: int) -> Run | None:
        for r in self.runs:
            if (r.task, r.head, r.seed) == (task, head, seed):
                return r
        return None

    def test_sets(self, task: str | None = None) -> list[str]:
        """Test sets evaluated by at least one finished run (internal first)."""
        found = {
            s
            for r in self.finished
            if task is None or r.task == task
            for s in (r.results.auroc if r.results else {})
        }
        return [s for s in TEST_SETS if s in found]

    def labels(self, task: str) -> list[str]:
        """The task's labels, most frequent in training first (ties keep the task order)."""
        runs = [r for r in self.finished if r.task == task]
        if not runs:
            return []
        order = list(runs[0].results.labels)  # type: ignore[union-attr]
        counts = runs[0].results.train_label_counts  # type: ignore[union-attr]
        if not counts:  # records written before qtl stored them: the NIH-CXR-LT counts
            counts = {x: LABEL_COUNTS.get(x, {}).get("train", 0) for x in order}
        return sorted(order, key=lambda x: -counts.get(x, 0))

    def train_counts(self, task: str) -> dict[str, int]:
        runs = [r for r in self.finished if r.task == task]
        return dict(runs[0].results.train_label_counts) if runs else {}  # type: ignore[union-attr]


def _task_key(task: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", task)
    return (int(digits) if digits else 10**6, task)


def _split_label(label: str, seed: int) -> tuple[str, str, int]:
    """A run label ``<task>-<arm>`` (the study's, e.g. cxr8-dqc, retinamnist-qvit-kd_joint)."""
    task, _, head = label.partition("-")
    return task, head, seed


def _from_config(config: Any) -> tuple[str, str, int] | None:
    """(task, arm, seed) from a recorded config: its study's run label."""
    from omegaconf import OmegaConf

    from qtl.studies import study_for

    try:
        cfg = config if not isinstance(config, dict) else OmegaConf.create(config)
        return _split_label(study_for(cfg).run_label(cfg), int(cfg.seed))
    except Exception:  # noqa: BLE001 - an unreadable config falls back to the next source
        return None


def _identify(job_dir: Path, root: Path, results: Results | None) -> tuple[str, str, int] | None:
    """(task, arm, seed) of a job directory from its records, Hydra's config, or its path."""
    if results is not None:
        if results.label:  # the study's run label (records from version 4 on)
            return _split_label(results.label, results.seed)
        if results.config and (key := _from_config(results.config)) is not None:
            return key
        match = _LABEL_DIR.match(job_dir.relative_to(root).as_posix())
        if match and int(match["seed"]) == results.seed:
            return _split_label(match["label"], results.seed)
        parts = results.run.split("/")
        if len(parts) >= 2 and parts[-1] == f"seed{results.seed}":
            return _split_label(parts[-2], results.seed)
        return str(results.task), str(results.head), results.seed
    payload = (RunFiles(job_dir, create=False).read_run_config() or {}).get("config")
    if isinstance(payload, dict) and (key := _from_config(payload)) is not None:
        return key
    hydra_cfg = job_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        from omegaconf import OmegaConf

        try:
            key = _from_config(OmegaConf.load(hydra_cfg))
        except Exception:  # noqa: BLE001 - an unreadable config falls back to the path
            key = None
        if key is not None:
            return key
    match = _SUBDIR.match(job_dir.relative_to(root).as_posix())
    if match:
        return match["task"], match["head"], int(match["seed"])
    return None


def _study_of(files: RunFiles) -> str:
    """The study of a run without results.json, from the config it recorded at its start."""
    from omegaconf import OmegaConf

    from qtl.studies import study_for

    config = (files.read_run_config() or {}).get("config")
    try:
        return study_for(OmegaConf.create(config)).name
    except Exception:  # noqa: BLE001 - no readable config: the first study's runs
        return "cxr"


def _why_no_result(job_dir: Path, history: list[EpochRow]) -> tuple[str, bool]:
    """A one-line reason for report.md (the run's recorded failure, the job's error, or how
    far it got) and whether it is a recorded failure."""
    failure = RunFiles(job_dir, create=False).read_failure()  # e.g. training diverged
    if failure is not None:
        message = failure.headline
        return message.strip().splitlines()[0][:300], True
    error = job_dir / "job_error.txt"  # written by qtl.report.callback for a failed job
    if error.exists():
        lines = error.read_text(errors="replace").strip().splitlines()
        return (lines[0][:300] if lines else "job failed"), True
    for log in sorted(job_dir.glob("*.log")):
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error" in x]
        if errors:
            return errors[-1][:200], False
    if history:
        return f"no results.json; stopped after epoch {history[-1].epoch}", False
    return "no results.json; no epoch finished", False


def _job_dirs(root: Path, skip: Path | None) -> list[Path]:
    """Directories holding a job's records (``wandb/`` and the report's own folder skipped)."""
    marks = ("results.json", "run_config.json", "metrics.jsonl", FAILED, ".hydra/config.yaml")
    found: set[Path] = set()
    for mark in marks:
        for path in root.rglob(mark):
            job = path.parent.parent if mark.startswith(".hydra") else path.parent
            if "wandb" in job.relative_to(root).parts:
                continue
            if skip is not None and (job == skip or skip in job.parents):
                continue
            found.add(job)
    return sorted(found)


def collect(root: Path | str, skip: Path | None = None) -> Sweep:
    """Every job under ``root``; ``skip`` is a folder to ignore (the report's output)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(
            f"report.sweep={root}: no such directory. Point it at a multirun folder, "
            "e.g. report.sweep=multirun/demo (the folder `launch.py -m ... name=demo` wrote)."
        )
    runs: list[Run] = []
    seen: set[tuple[str, str, int]] = set()
    for job in _job_dirs(root, skip.resolve() if skip else None):
        files = RunFiles(job, create=False)
        try:
            results = files.read_results()  # the one read of this job's results.json
        except RecordError:
            results = None  # not a qtl record: reported as a run without a result
        key = _identify(job, root, results)
        if key is None or key in seen:
            continue
        seen.add(key)
        history = files.read_metrics()
        study = results.study if results is not None else _study_of(files)
        run = Run(*key, dir=job, results=results, history=history, study=study)
        if results is None:
            run.problem, run.failed_run = _why_no_result(job, history)
        runs.append(run)
    if not runs:
        raise ReportError(
            f"report.sweep={root}: no runs found (no results.json, run_config.json or "
            ".hydra/config.yaml below it). Is this the folder a multirun wrote "
            "(multirun/<name>)?"
        )
    runs.sort(key=lambda r: (_task_key(r.task), r.head != "cdl", r.head, r.seed))
    missing = []
    for task in {r.task for r in runs}:
        heads = {r.head for r in runs if r.task == task}
        seeds = {r.seed for r in runs if r.task == task}
        missing += [(task, h, s) for h in heads for s in seeds if (task, h, s) not in seen]
    missing.sort(key=lambda k: (_task_key(k[0]), k[1] != "cdl", k[1], k[2]))
    return Sweep(root=root, runs=runs, missing=missing)
