"""Sweep summary: after a multirun, one line per job - finished, resumed, skipped or failed.

A Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/config.yaml``). Each job,
wherever it runs (this process, a gpu_pool subprocess, a SLURM node), writes a small record
to ``<sweep dir>/.sweep_jobs/<job number>.json`` when it starts and when it ends; the
launching process reads them at the end and prints the table, also written to
``<sweep dir>/sweep_summary.txt`` (and ``.json``). The table is also written when the sweep
ends with an error (a failed job makes Hydra raise after all jobs ran), so the researcher
always sees which runs are done and where their outputs are.

Job states: ``finished`` (trained to the end now), ``resumed`` (continued from a
checkpoint and finished), ``skipped`` (finished already: results.json was there),
``failed`` (with the first line of its error, or the reason the run recorded in its
failed.json, e.g. training diverged) and ``unfinished`` (started, never reported an end:
killed, or still running/requeued on the cluster).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qtl.record.files import RecordError, RunFiles
from qtl.utils.files import write_json_atomic

RECORDS = ".sweep_jobs"


def _before(run_dir: Path) -> str:
    """What a job will do in this run directory: skip it, resume it, or start it."""
    status = RunFiles(run_dir, create=False).status()
    return {"finished": "skip", "started": "resume"}.get(status, "new")


def _recorded_failure(record: dict[str, Any]) -> str | None:
    """The first line of the run's own failed.json, if it wrote one."""
    folder = record.get("output_dir")
    failure = RunFiles(Path(folder), create=False).read_failure() if folder else None
    return None if failure is None else failure.headline


def _slurm_job_id() -> str | None:
    """The id squeue/sacct/scancel know this job by: ``<array>_<task>`` inside a job array."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()[:300]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=1)


class SweepSummary(Callback):
    """Records every job of a multirun and prints/writes the table at the end."""

    def __init__(self, filename: str = "sweep_summary") -> None:
        self.filename = filename
        self._records: str | None = None  # set in the launching process, copied to jobs
        self._sweep_dir: str | None = None
        self._done = False

    # -- launching process ------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        records = sweep_dir / RECORDS
        shutil.rmtree(records, ignore_errors=True)  # records of an earlier run of this sweep
        records.mkdir(parents=True, exist_ok=True)
        self._sweep_dir, self._records = str(sweep_dir), str(records)
        atexit.register(self.write_summary)  # also when the sweep ends with an exception

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write_summary()

    # -- each job, wherever it runs -------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._records is None:
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        record = {
            "num": int(config.hydra.job.num),
            "overrides": list(OmegaConf.to_container(config.hydra.overrides.task)),
            "output_dir": str(run_dir),
            "before": _before(run_dir),
            "state": "unfinished",
            "host": socket.gethostname(),
            "slurm_job_id": _slurm_job_id(),
            "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "started": time.time(),
        }
        _write_json(self._record_path(config), record)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self._records is None:
            return
        path = self._record_path(config)
        record = json.loads(path.read_text()) if path.exists() else {}
        if job_return.status == JobStatus.COMPLETED:
            done = {"skip": "skipped", "resume": "resumed"}
            record["state"] = done.get(record.get("before", "new"), "finished")
        else:
            record["state"] = "failed"
            record["error"] = _first_line(job_return._return_value)
        record["ended"] = time.time()
        _write_json(path, record)

    def _record_path(self, config: DictConfig) -> Path:
        assert self._records is not None
        return Path(self._records) / f"{int(config.hydra.job.num):05d}.json"

    # -- the table ----------------------------------------------------------------------
    def write_summary(self) -> str | None:
        """Print the table and write it next to the sweep (once per sweep)."""
        if self._done or self._records is None or self._sweep_dir is None:
            return None
        self._done = True
        records = [json.loads(p.read_text()) for p in sorted(Path(self._records).glob("*.json"))]
        for r in records:  # a job that died after recording its failure (no end reported)
            if r.get("state") == "unfinished" and _recorded_failure(r) is not None:
                r["state"] = "failed"
        text = format_summary(self._sweep_dir, records)
        sweep_dir = Path(self._sweep_dir)
        (sweep_dir / f"{self.filename}.txt").write_text(text + "\n")
        _write_json(sweep_dir / f"{self.filename}.json", {"jobs": records})
        print(text, flush=True)
        return text


def _note(record: dict[str, Any]) -> str:
    if record["state"] == "failed":
        return _recorded_failure(record) or record.get("error", "")
    files = RunFiles(Path(record["output_dir"]), create=False)
    try:
        res = files.read_results()
    except RecordError:  # another app's results.json (a non-qtl task in the same sweep)
        return "finished (results.json is not a qtl record)"
    if record["state"] == "unfinished" or res is None:
        restarts = record.get("slurm_restarts") or 0
        requeued = f"; requeued {restarts}x" if restarts else ""
        return f"no end recorded (killed, or still running){requeued}"
    test = res.mean_auroc("test")
    note = f"best epoch {res.best_epoch}/{res.epochs}"
    return note + (f", test mean AUROC {test:.3f}" if test is not None else "")


def _shown(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def format_summary(sweep_dir: str, records: list[dict[str, Any]]) -> str:
    """The sweep table: a count per state, then one line per job."""
    states = ("finished", "resumed", "skipped", "failed", "unfinished")
    counts = {s: sum(r["state"] == s for r in records) for s in states}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"[qtl] sweep {_shown(sweep_dir)}: {len(records)} job(s): {head or 'none'}"]
    if counts["skipped"] == len(records) and records:
        lines[0] += " - every run had finished already, nothing was trained"
    width = max([len(_shown(r["output_dir"])) for r in records] + [7])
    for r in records:
        lines.append(
            f"  #{r['num']:<3} {r['state']:<10} {_shown(r['output_dir']):<{width}}  {_note(r)}"
        )
    return "\n".join(lines)
