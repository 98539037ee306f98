"""Named crash points, for proving that a run killed at any moment resumes.

``QTL_FAULT=<point>[@<n>]`` kills the process with SIGKILL (no cleanup, no ``finally``, as
a scheduler's ``kill -9`` or a lost node would) the ``n``-th time (default: first) the run
reaches ``<point>``. ``QTL_FAULT_ACTION=raise`` raises :class:`InjectedFault` instead, for
in-process tests. Unset, :func:`point` is a dictionary lookup and nothing else.

Points, in the order a run reaches them (``qtl.train.loop``, ``qtl.train.driver``), then the
feature cache's (``FEATURE_POINTS``):

- ``before_best_save``: an improved epoch is trained and validated, nothing saved yet
- ``between_best_and_last``: ``best`` is on disk, ``last`` (the commit) is not
- ``after_last_save``: ``last`` is committed; old steps not pruned, metrics.jsonl not rewritten
- ``evaluate``: training ended, the best checkpoint is restored, no predictions written
- ``between_predictions``: the first predictions file is written, results.json is not
- ``feature_chunk``: a chunk of backbone features is on disk, the split's manifest is not
  (``qtl.data.features``; reached once per chunk written)
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = (
    "before_best_save",
    "between_best_and_last",
    "after_last_save",
    "evaluate",
    "between_predictions",
)
# reached while filling the feature cache (mode=features, or a features.cache=true run)
FEATURE_POINTS = ("feature_chunk",)
_reached: dict[str, int] = {}


class InjectedFault(BaseException):
    """``QTL_FAULT_ACTION=raise``: a BaseException, so no ``except Exception`` swallows it."""


def point(name: str) -> None:
    """Crash here if ``QTL_FAULT`` names this point (and this is its n-th arrival)."""
    spec = os.environ.get("QTL_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target not in POINTS + FEATURE_POINTS:
        known = ", ".join(POINTS + FEATURE_POINTS)
        raise ValueError(f"QTL_FAULT={spec!r}: the point must be one of {known}")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    if os.environ.get("QTL_FAULT_ACTION") == "raise":
        raise InjectedFault(name)
    print(f"[qtl] QTL_FAULT: killing the process at {name}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the arrivals counted so far (an in-process test starting its next run)."""
    _reached.clear()
