"""Stop requests from a scheduler: finish the step, checkpoint, then let the scheduler act.

SLURM signals a job before its time limit or on preemption (submitit asks for SIGUSR2,
``--signal=USR2@<delay>``); ``scontrol requeue``, ``scancel`` and an interrupted gpu_pool
sweep send SIGTERM. A handler that ran the requeue at once would lose the epoch in
progress, which for the study's 19-qubit runs is hours. So while training runs, these
signals only raise a flag; the loop checks it after every step, saves a checkpoint with its
position in the epoch, and then hands the signal to whoever handled it before (submitit:
requeue the job and exit; no handler: the default action, which ends the process).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from qtl.utils.errors import EXIT_DIVERGED, QtlError
from qtl.utils.runlock import release_held

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; rerunning resumes it.

    A ``SystemExit``, not an error: the job leaves without recording a result (Hydra and
    submitit let it through), so the scheduler's requeue - not a "failed" record - decides
    what happens next.
    """


class TrainingDiverged(QtlError, RuntimeError):
    """The loss, a gradient or a weight became NaN/Inf, or a rerun met a run recorded so.

    Nothing after the last good checkpoint was saved, and the run directory's failed.json
    says where it happened. (Here, next to :class:`TrainingInterrupted`, so the launcher
    can name both without importing the trainer.)
    """

    exit_code = EXIT_DIVERGED


class StopRequest:
    """Context manager: while inside, STOP_SIGNALS set :attr:`signum` instead of acting."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # whoever ignores this signal keeps ignoring it
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            print(
                f"[qtl] {signal.Signals(signum).name} received: checkpointing after this step",
                file=sys.stderr,
                flush=True,
            )
        self.signum = signum

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def hand_over(self, where: str) -> None:
        """After the checkpoint: pass the signal on to the previous handler, then stop."""
        signum = self.signum
        assert signum is not None
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        print(f"[qtl] checkpoint saved ({where}); stopping", file=sys.stderr, flush=True)
        release_held()  # the run directory: free for the requeued job at once
        if callable(previous):
            previous(signum, None)  # submitit: `scontrol requeue` this job, then exit
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action: end the process
        raise TrainingInterrupted(
            f"[qtl] stopped by {signal.Signals(signum).name} after saving a checkpoint "
            f"({where}); rerun the same command to resume"
        )
