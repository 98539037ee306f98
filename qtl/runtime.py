"""Process-wide JAX settings, applied once before any computation.

- no GPU memory preallocation: several jobs may share one GPU, and a job should hold only
  what it uses;
- a persistent compilation cache, so a resumed or repeated run skips recompiling its steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _quiet_closed_loop(unraisable: Any) -> None:
    """Drop one known-benign message, pass everything else to Python's default hook.

    When Orbax's restore of a damaged checkpoint fails inside its asyncio loop, a tensorstore
    callback can arrive after that loop closed; Python then prints "Exception ignored ...
    RuntimeError: Event loop is closed" at some later moment (often at exit). qtl has already
    handled the failure (the step is moved aside, a warning names it), so this traceback would
    only break the one-line message a researcher gets.
    """
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def configure_jax(cache_dir: str | os.PathLike | None = None) -> None:
    """Apply qtl's JAX defaults (environment variables set by the user win)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _quiet_closed_loop
    import logging

    import jax

    # Orbax logs every save/restore at INFO through absl; keep run logs readable.
    for name in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)

    path = cache_dir or os.environ.get("QTL_JAX_CACHE") or Path(".cache") / "jax"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only location: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    # programs that compile in under a second are recompiled rather than cached (the cache
    # stays small over a long sweep); QTL_JAX_CACHE_MIN_SECONDS=0 caches every one (the tests'
    # many short launches of the same tiny programs)
    min_seconds = float(os.environ.get("QTL_JAX_CACHE_MIN_SECONDS", "1.0"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
