"""qtl's error classes, by what the user does next; their exit status is the one mapping.

Every error qtl raises for something outside its code - a config value, a file, a disk, a
diverged optimisation - derives from :class:`QtlError` and names its exit status there;
``qtl.apps.run_job`` prints such an error as one line and exits with that status (no
traceback). Errors raised and caught inside qtl (a corrupt cache entry that is decoded again,
an unavailable native kernel that falls back) derive from :class:`Handled` instead, so
``tests/test_errors.py`` can check that every error class qtl defines is one or the other.
"""

from __future__ import annotations

from typing import ClassVar

# Exit status of a single run that stopped on a known cause (a sweep exits 1 instead).
EXIT_INPUT, EXIT_SAVE, EXIT_DIVERGED = 2, 3, 4


class QtlError(Exception):
    """An error that reaches the user as one line and ``exit_code``."""

    exit_code: ClassVar[int] = 1


class QtlUserError(QtlError):
    """Bad input: a config value, a data or record file, a run directory in use (exit 2).

    Fix the command, the data or the config; nothing already computed was removed.
    """

    exit_code: ClassVar[int] = EXIT_INPUT


class Handled(Exception):  # noqa: N818 - a marker, not an error users see
    """Raised and caught inside qtl (the caller recovers); never reaches the user."""
