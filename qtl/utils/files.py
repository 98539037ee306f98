"""Whole-or-nothing writes and cross-process locks.

Every file qtl writes for later reuse (records, manifests, caches' markers) goes through
:func:`atomic_write_bytes`: the bytes land in a temporary file in the same folder, are
fsynced, and are renamed over the target, so a kill or a full disk leaves either the old
file or the new one, never half of one. :func:`file_lock` serialises work that parallel jobs
of a sweep would otherwise duplicate (generating a dataset, pretraining, building a kernel);
on a filesystem without locks (Lustre mounted without ``flock``) a caller whose work is
written whole entry by entry (the image and feature caches) may let it run twice instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qtl.utils.errors import EXIT_SAVE, QtlError

_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "the folder vanished (deleted or unmounted during the run)",
    errno.EIO: "an I/O error from the disk",
}


class SaveError(QtlError, RuntimeError):
    """A checkpoint or record that could not be written; the message names where and why.

    Fix the disk (space, permissions, mount) and rerun: the run resumes (exit 3)."""

    exit_code = EXIT_SAVE


def describe_os_error(code: int) -> str:
    """A researcher's reading of an errno (``28`` -> "the disk is full ...")."""
    return _CAUSES.get(code, f"{errno.errorcode.get(code, 'error')} ({os.strerror(code)})")


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The temporary file is created readable by this user only, and gets ``mode`` (whatever the
    umask) before the rename; the rename is fsynced too, so it survives a power loss. A
    failure raises :class:`SaveError` naming the file and the cause, and leaves no temp file.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        cause = describe_os_error(err.errno) if err.errno else str(err)
        raise SaveError(
            f"could not write {path}: {cause} ({err}). Fix that and rerun the same command: "
            "the run resumes from its last checkpoint and writes this file again."
        ) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def atomic_write_text(path: Path | str, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode=mode)


def write_json_atomic(path: Path | str, data: Any, *, indent: int | None = 2) -> Path:
    """JSON (``default=str`` for paths and enums) written whole or not at all."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: Path | str, *, optional: bool = False) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block.

    One process does the work; the others wait and then find it done. ``optional``: where the
    filesystem has no locks, go on without one (the work must then be safe to do twice at
    once). Without ``fcntl`` (not POSIX) there is no lock; callers still write atomically, so
    the result stays whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            if not optional or err.errno not in _NO_LOCKS:
                raise
            _warn_no_locks(path, err)
            yield  # the work is written atomically: at worst two jobs both do it
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# flock(2) errors of a filesystem without (cross-node) locks: Lustre mounted without
# -o flock gives ENOSYS, an NFS mount without a lock manager ENOLCK
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_WARNED: set[str] = set()


def _warn_no_locks(path: Path, err: OSError) -> None:
    if str(path.parent) in _WARNED:
        return
    _WARNED.add(str(path.parent))
    print(
        f"[qtl] note: the filesystem of {path.parent} has no file locks ({err.strerror}); "
        "parallel jobs may repeat work there, and what they write stays whole.",
        flush=True,
    )
