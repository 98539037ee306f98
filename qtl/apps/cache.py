"""``mode=cache``: re-check every source image of the run's splits and fill the image cache
ahead of training (a sweep's jobs then only read it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtl.config import QtlConfig, validate


def main(cfg: QtlConfig, run_dir: Path | None = None) -> Any:
    from qtl.data.cache import build

    validate(cfg)
    return build(cfg, run_dir)
