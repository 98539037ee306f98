"""The study's comparison from a sweep directory alone: tables, paired t-tests, figures.

    python launch.py mode=report report.sweep=multirun/demo

writes ``<sweep>/report/``: ``report.md``, ``tables/*.{csv,md}``, ``figures/*.png``; the
Hydra callback in ``conf/config.yaml`` does the same when a multirun ends.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    # Lazy: Hydra instantiates this package's callback at every start, and the report's
    # matplotlib and SciPy would add ~1.3 s to every run, report or not.
    if name == "write_report":
        from qtl.report.build import write_report

        return write_report
    raise AttributeError(f"module 'qtl.report' has no attribute {name!r}")
