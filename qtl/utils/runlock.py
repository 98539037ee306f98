"""One process per run directory, on one machine or on the nodes of a shared filesystem.

A run's checkpoints, metrics and records are rewritten in place; two processes on one run
(a grid launched again while it still runs, a requeued job whose old process has not died)
would prune each other's checkpoints. The holder of a run directory owns a lock file in it,
``.qtl-run.lock``: JSON naming host, pid, boot and start time. It is created whole by
``link(2)`` of a private temporary file - atomic and exclusive on local disks and on NFS,
where ``O_EXCL`` and ``flock`` have not always been (Linux ``open(2)``, "O_EXCL").

A holder that died does not block the next process:

- same host (and the same boot): its pid is gone, or now belongs to a process started at
  another time (pids are reused);
- another host: pids there mean nothing here, so the holder proves it is alive by touching
  the file every :data:`HEARTBEAT_S` seconds; a file untouched for :data:`STALE_S` seconds is
  a dead holder's (this assumes the nodes' clocks agree within a minute, as NTP keeps them).

A run of several processes (``train.processes``, ``qtl.utils.distributed``) is one holder:
process 0 takes the lock and the others take none. They belong to process 0's run by
construction - JAX's distributed runtime admits exactly ``train.processes`` processes at
process 0's coordinator, and none of them trains before process 0 has the lock and says so
(``distributed.verdict``); if process 0 is refused, all exit with its status. A second run
of the same directory is refused by process 0's lock as any other process would be.

Breaking a dead holder's lock renames it to a private name first, so of two processes
breaking it at once only one wins; the loser puts back what it took if that was the winner's
fresh lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtl.utils.errors import QtlUserError

LOCK_NAME = ".qtl-run.lock"
HEARTBEAT_S = 10.0  # the holder touches its lock file this often
STALE_S = 90.0  # untouched this long: a holder on another host is dead
POLL_S = 2.0  # a waiting process looks again this often


class RunBusy(QtlUserError):
    """Another live process holds the run directory (a user error: exit 2)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory, as written in its lock file."""

    host: str
    pid: int
    since: float
    boot: str | None = None
    started: str | None = None  # the pid's start time (clock ticks after boot, /proc)
    token: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {when}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def holder_alive(holder: Holder, mtime: float, *, now: float | None = None) -> bool:
    """Whether the process named by a lock file (touched last at ``mtime``) still runs."""
    now = time.time() if now is None else now
    if holder.host == socket.gethostname():
        if holder.boot and _boot_id() and holder.boot != _boot_id():
            return False  # written before this host rebooted
        if not _pid_alive(holder.pid):
            return False
        started = _start_time(holder.pid)
        return holder.started is None or started is None or started == holder.started
    return now - mtime < STALE_S


def read_holder(path: Path) -> tuple[Holder, float] | None:
    """The lock file's holder and when it was last touched; None when there is none.

    A file that is not a lock record (hand-made, cut short by a crash of the filesystem)
    counts as a dead holder's, so it never blocks a run forever.
    """
    try:
        st = path.stat()
        data = json.loads(path.read_text())
        return Holder(**data), st.st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return Holder(host="?", pid=-1, since=0.0, token="unreadable"), 0.0


class RunLock:
    """The lock of one run directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.me = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.time(),
            boot=_boot_id(),
            started=_start_time(os.getpid()),
            token=uuid.uuid4().hex,
        )
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _try_create(self) -> bool:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".qtl-run.lock.{self.me.token}.tmp"
        tmp.write_text(json.dumps(self.me.__dict__))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _break(self, stale: Holder) -> None:
        """Remove a dead holder's lock, and only that one (see the module docstring)."""
        aside = self.run_dir / f".qtl-run.lock.{self.me.token}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        taken = read_holder(aside)
        if taken is not None and taken[0].token != stale.token:
            with contextlib.suppress(OSError):  # a fresh lock: put it back
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            aside.unlink()

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock, or raise :class:`RunBusy` naming the live holder (``wait``: poll
        until it is free instead)."""
        announced = False
        while True:
            if self._try_create():
                self._beat = threading.Thread(target=self._heartbeat, daemon=True)
                self._beat.start()
                _HELD.add(self)
                return
            found = read_holder(self.path)
            if found is None:
                continue  # released between our attempt and the read
            holder, mtime = found
            if not holder_alive(holder, mtime):
                print(
                    f"[qtl] {self.run_dir}: the process that held this run ("
                    f"{holder.describe() if holder.pid >= 0 else 'unreadable lock file'}) "
                    "is gone; taking it over.",
                    flush=True,
                )
                self._break(holder)
                continue
            if not wait:
                raise RunBusy(
                    f"run directory {self.run_dir} is in use by another process "
                    f"({holder.describe()}); nothing was changed there. Wait for it to end, "
                    "rerun with train.wait_for_lock=true to wait for it, or stop that process."
                )
            if not announced:
                print(f"[qtl] {self.run_dir}: waiting for {holder.describe()} ...", flush=True)
                announced = True
            time.sleep(POLL_S)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        _HELD.discard(self)
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        found = read_holder(self.path)
        if found is not None and found[0].token == self.me.token:
            with contextlib.suppress(OSError):
                self.path.unlink()


_HELD: set[RunLock] = set()


def release_held() -> None:
    """Release every lock this process holds: for a process about to be ended by a signal
    (no ``finally`` runs then), so the next holder - maybe on another node, where only a
    stale heartbeat would free it - need not wait."""
    for lock in list(_HELD):
        lock.release()


@contextlib.contextmanager
def hold_run_dir(run_dir: Path | str, *, wait: bool = False) -> Iterator[RunLock]:
    """Hold ``run_dir`` for the ``with`` block (see :class:`RunLock`)."""
    lock = RunLock(run_dir)
    lock.acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()


def one_process_per_run(fn: Any) -> Any:
    """Decorate ``fn(cfg, run_dir, ...)`` to run while holding ``run_dir``'s lock
    (``cfg.train.wait_for_lock``: wait for a live holder instead of refusing)."""
    import functools

    from qtl.utils import distributed

    @functools.wraps(fn)
    def wrapper(cfg: Any, run_dir: Path, *args: Any, **kwargs: Any) -> Any:
        if not distributed.is_primary():  # process 0 holds it for the run (module docstring)
            return fn(cfg, run_dir, *args, **kwargs)
        try:
            lock = hold_run_dir(run_dir, wait=bool(getattr(cfg.train, "wait_for_lock", False)))
            lock.__enter__()
        except RunBusy as err:
            distributed.verdict(err.exit_code)  # the run's other processes exit with it
            raise
        try:
            return fn(cfg, run_dir, *args, **kwargs)
        finally:
            lock.__exit__(None, None, None)

    return wrapper


__all__ = [
    "HEARTBEAT_S",
    "LOCK_NAME",
    "STALE_S",
    "Holder",
    "RunBusy",
    "RunLock",
    "hold_run_dir",
    "holder_alive",
    "one_process_per_run",
    "read_holder",
    "release_held",
]
