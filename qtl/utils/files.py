"""Whole-or-nothing writes and cross-process locks.

Every file qtl writes for later reuse (records, manifests, caches' markers) goes through
:func:`atomic_write_bytes`: the bytes land in a temporary file in the same folder, are
fsynced, and are renamed over the target, so a kill or a full disk leaves either the old
file or the new one, never half of one. :func:`file_lock` serialises work that parallel jobs
of a sweep would otherwise duplicate (generating a dataset, pretraining, building a kernel).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path | str, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode=mode)


def write_json_atomic(path: Path | str, data: Any, *, indent: int | None = 2) -> Path:
    """JSON (``default=str`` for paths and enums) written whole or not at all."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block.

    One process does the work; the others wait and then find it done. Without ``fcntl``
    (not POSIX) there is no lock; callers still write atomically, so the result stays whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
