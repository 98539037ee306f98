"""The study's comparison from a sweep directory alone: tables, paired t-tests, figures.

    python launch.py mode=report report.sweep=multirun/demo

writes ``<sweep>/report/``: ``report.md``, ``tables/*.{csv,md}``, ``figures/*.png``; the
Hydra callback in ``conf/config.yaml`` does the same when a multirun ends.
"""

from qtl.report.build import write_report

__all__ = ["write_report"]
