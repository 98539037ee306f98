"""Progress bars that stay quiet when nobody is watching (not a TTY, CI, log files)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def want_progress(setting: bool | None) -> bool:
    """``progress=null`` means: only when stderr is a terminal."""
    if setting is None:
        return sys.stderr.isatty()
    return bool(setting)


def bar(*, enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar, or a disabled one that still accepts update()/set_postfix()."""
    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)
