"""hydra-submitit-launcher, plus: a sweep that is stopped cancels the jobs it submitted.

The released launcher submits the sweep's jobs and waits for them; Ctrl-C or a SIGTERM to the
sweep's process leaves them queued or running on the cluster, still writing into the run
directories a rerun would use. Here that stop cancels every job of the sweep first (``scancel``
for SLURM: the job gets SIGTERM, on which qtl checkpoints before it leaves; SIGINT for
submitit's local executor) and then ends the sweep; rerunning the same command submits them
again, and each resumes from its checkpoint.

Used by ``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``); the local variant is
for tests and single machines (``hydra.launcher._target_=...QtlLocalLauncher`` on top of
``hydra/launcher=submitit_local``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _CancelOnStop:
    """Mixin for BaseSubmititLauncher: record the submitted jobs, cancel them on a stop."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs in the job's own process (submitit unpickles the launcher there), where
        launch.py's module code never ran: register the schema and the run-dir resolvers
        (the study's run label) before Hydra resolves the job's folder."""
        from qtl.studies import register_configs

        register_configs()
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        submitted: list[Any] = []
        original = submitit.AutoExecutor.map_array

        def map_array(executor: Any, *args: Any, **kwargs: Any) -> list[Any]:
            jobs = original(executor, *args, **kwargs)
            submitted.extend(jobs)
            return jobs

        previous = {s: signal.signal(s, _interrupt) for s in _STOP_SIGNALS}
        submitit.AutoExecutor.map_array = map_array  # type: ignore[method-assign]
        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        except BaseException:
            _cancel(submitted)
            raise
        finally:
            submitit.AutoExecutor.map_array = original  # type: ignore[method-assign]
            for s, handler in previous.items():
                signal.signal(s, handler)


def _cancel(jobs: list[Any]) -> None:
    """Cancel what has not ended; never raises (it runs while the stop propagates)."""
    live = []
    for job in jobs:
        try:
            if not job.done():
                job.cancel(check=False)
                live.append(str(job.job_id))
        except Exception as err:  # noqa: BLE001
            log.warning(f"could not cancel job {getattr(job, 'job_id', '?')}: {err}")
    if live:
        log.warning(
            f"sweep stopped: cancelled {len(live)} job(s) ({', '.join(live)}); rerun the same "
            "command to resume them from their checkpoints"
        )


class QtlSlurmLauncher(_CancelOnStop, SlurmLauncher):
    """``hydra/launcher=slurm``: SLURM job arrays, cancelled when the sweep is stopped."""


class QtlLocalLauncher(_CancelOnStop, LocalLauncher):
    """submitit's local executor, cancelled when the sweep is stopped."""
