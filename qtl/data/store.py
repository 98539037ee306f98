"""The image cache's storage: one file per entry, written under a temporary name and renamed.

Why not a database: the cache is shared by every job of a sweep, and on a cluster those jobs
run on several nodes over a network filesystem. SQLite's locking relies on POSIX byte-range
locks that NFS and Lustre implement partly or not at all (SQLite's documentation, "How To
Corrupt An SQLite Database File", section 2.1), so the diskcache database qtl used before
could be corrupted by two nodes writing at once. Here a writer never touches a file another
process may read: it writes a private temporary file in the entry's folder and renames it
over the entry's name. ``rename(2)`` within one folder is atomic on local filesystems, NFS
and Lustre, so a reader on any node sees no entry or a whole one; two writers of one entry
write the same bytes, and the last rename wins. No lock is needed.

A power loss after the rename can still leave an entry short (the data is not fsynced: one
fsync per image would slow a 112k-image build several-fold on a network filesystem); the
codec's checksum catches that on read and the entry is rebuilt from its source image.

Layout: ``<cache_dir>/entries/<kind>/<first 2 hex digits>/<digest>`` for a key
``<kind>:<digest>`` (``img`` or ``index``). Values are bytes; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

LAYOUT = "entries"  # the folder of this layout inside the cache directory
OLD_DATABASE = "cache.db"  # the diskcache (SQLite) layout qtl wrote before: no longer read
_KEY = re.compile(r"(img|index):([0-9a-f]{8,64})")


class FileStore:
    """A key -> bytes store with one file per key (see the module docstring)."""

    def __init__(self, directory: Path | str):
        self.directory = str(Path(directory))
        self.root = Path(directory) / LAYOUT
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key``; anything but qtl's own key form is refused."""
        found = _KEY.fullmatch(key) if isinstance(key, str) else None
        if found is None:
            raise ValueError(f"not a qtl image-cache key: {key!r}")
        kind, digest = found.groups()
        return self.root / kind / digest[:2] / digest

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None when there is no entry."""
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` whole: a private temporary file renamed over the entry."""
        if type(value) is not bytes:
            raise TypeError(f"qtl's cache values are bytes, not {type(value).__name__}")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __len__(self) -> int:
        return sum(1 for p in self.root.glob("*/*/*") if not p.name.startswith("."))

    def close(self) -> None:
        """Nothing to release (kept for callers written for a database)."""
