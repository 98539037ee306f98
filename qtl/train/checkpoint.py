"""Orbax checkpoints of the train state: the last epoch (to resume) and the best (to evaluate).

The state is saved as a flat dict of arrays keyed by position, with the pytree paths in the
JSON metadata; restore rebuilds it in the structure of a freshly initialised state, after
checking that every path and shape agrees. That keeps checkpoints independent of how
Flax/optax register their pytree classes.

Crash safety rests on one commit point. A step directory is complete or absent (Orbax writes
``<step>.orbax-checkpoint-tmp`` and renames it when done; leftovers are removed when the
next run opens the folder). At the end of an epoch the loop saves ``best/<epoch>`` if the
epoch improved, then ``last/<step>``, whose bookkeeping names the best epoch: saving ``last``
is the commit. Only then are the steps it supersedes pruned, so a kill before the commit
leaves the previous ``last`` and the ``best`` it names untouched, and the rerun redoes the
epoch, replacing the uncommitted ``best/<epoch>`` it finds (the defect this replaces: Orbax's
``StepAlreadyExistsError`` on every rerun).

Several processes (``train.processes``): every process calls every save, restore, prune
and delete (Orbax's multi-process protocol: each process writes the array shards it owns,
process 0 the metadata and the final rename, with barriers between), and restores into
arrays replicated over the run's global mesh (``sharding``), so all resume from one step.

Saves are synchronous: a disk that is full, read-only or gone fails the save at once with a
:class:`CheckpointSaveError` naming the folder and the cause, instead of surfacing later from
a background thread.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qtl.record.files import SaveError, describe_os_error
from qtl.utils.distributed import barrier, is_primary
from qtl.utils.errors import Handled, QtlUserError

DAMAGED = "damaged"  # where unreadable steps are moved (inside the checkpoint folder)


class CheckpointError(QtlUserError, RuntimeError):
    """A checkpoint that does not fit the run's model (different config or code)."""


class _Damaged(Handled):
    """A step whose files cannot be read back (bit rot, a cut-short copy, a lost flush)."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(f"step {step}: {type(cause).__name__}: {cause}")
        self.step, self.cause = step, cause


class CheckpointSaveError(SaveError):
    """A checkpoint that could not be written; the complete ones before it are kept."""


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _flatten(tree: Any) -> tuple[dict[str, Any], list[str]]:
    """Leaves by position; typed PRNG keys (a ViT's dropout stream) as their raw key data,
    which is what an array store can hold (restore wraps them back like the template's)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    flat = {
        f"{i:05d}": jax.random.key_data(leaf) if _is_key(leaf) else leaf
        for i, (_, leaf) in enumerate(leaves)
    }
    return flat, paths


def _errno(err: BaseException) -> int | None:
    """The OS error behind ``err``: an OSError in its chain, or tensorstore's os_error_code."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


class Checkpoints:
    """``<dir>/last`` and ``<dir>/best``; see the module docstring for the save protocol."""

    def __init__(self, directory: Path, sharding: Any = None):
        """``sharding``: where restored arrays go (a replicated sharding of a run over several
        processes); None: this process's default device, as saved."""
        self.directory = Path(directory).absolute()
        self.sharding = sharding
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruned by `prune` after each commit, never before it
            create=True,
            cleanup_tmp_directories=True,  # half-written steps of a killed save
            enable_async_checkpointing=False,  # a failed save raises here, not in a thread
        )
        self._options = options
        try:
            self._managers = {
                name: ocp.CheckpointManager(self.directory / name, options=options)
                for name in ("last", "best")
            }
        except Exception as err:
            raise CheckpointSaveError(self._why(err, "open the checkpoint folder")) from err

    def _why(self, err: BaseException, doing: str, path: Path | None = None) -> str:
        path = path or self.directory
        code = _errno(err)
        cause = describe_os_error(code) if code else f"{type(err).__name__}"
        detail = str(err).strip().splitlines()[0][:240] if str(err).strip() else ""
        try:
            free = f"; {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free there"
        except OSError:
            free = ""
        if code == errno.ENOENT:
            after = (
                f"The checkpoints that were in {self.directory} are gone with it; rerun the "
                "same command to start the run over, or put the folder back first to resume."
            )
        else:
            after = (
                f"The checkpoints that were complete before stay usable in {self.directory}; "
                "fix the cause (free space, permissions, the mount) and rerun the same "
                "command to resume from them."
            )
        return f"could not {doing} in {path}: {cause}{free} ({detail}). {after}"

    @staticmethod
    def _unit(which: str) -> str:
        return "epoch" if which == "best" else "step"

    def steps(self, which: str) -> list[int]:
        return sorted(self._managers[which].all_steps())

    def latest_epoch(self, which: str) -> int | None:
        """The newest complete step of ``which`` (the global step for ``last``)."""
        return self._managers[which].latest_step()

    def save(self, which: str, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save and return once it is on disk; a step already there is replaced.

        A step can only be there already if a run crashed after writing it and before the
        commit that would have made it count (an improved epoch's ``best``).
        """
        folder = self.directory / which
        if not folder.is_dir():
            raise CheckpointSaveError(
                self._why(
                    FileNotFoundError(errno.ENOENT, "checkpoint folder vanished", str(folder)),
                    f"save the '{which}' checkpoint of {self._unit(which)} {step}",
                    folder,
                )
            )
        flat, paths = _flatten(state)
        manager = self._managers[which]
        try:
            if step in manager.all_steps():
                manager.delete(step)
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(flat),
                    meta=ocp.args.JsonSave({**meta, "paths": paths}),
                ),
                force=True,
            )
            manager.wait_until_finished()
        except Exception as err:
            raise CheckpointSaveError(
                self._why(
                    err, f"save the '{which}' checkpoint of {self._unit(which)} {step}", folder
                )
            ) from err

    def prune(self, last: int, best: int | None) -> None:
        """Delete what the committed ``last/<last>`` supersedes: older ``last`` steps and any
        ``best`` other than the one it names (kept all when that one is missing).

        Failing to delete only leaves disk space used, so it warns instead of stopping a run.
        """
        keep = {"last": last, "best": best}
        for which, manager in self._managers.items():
            steps = manager.all_steps()
            if keep[which] not in steps:
                continue
            for step in steps:
                if step == keep[which] or (which == "last" and step > last):
                    continue
                try:
                    manager.delete(step)
                except Exception as err:  # noqa: BLE001 - see docstring
                    print(
                        f"[qtl] warning: could not delete {self.directory / which / str(step)}"
                        f" ({type(err).__name__}: {err})",
                        file=sys.stderr,
                    )

    def restore(
        self, which: str, template: Any, step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: the newest intact state) into ``template``'s structure.

        Without ``step``, ``last`` falls back, loudly: its newest step, then the older ones,
        then ``best``'s steps, newest first (each a complete state with its bookkeeping,
        saved at an epoch's end). Every step that cannot be read is named in a warning and
        moved aside to ``<dir>/damaged/`` (kept, never deleted). With ``step``, a damaged step
        is moved aside and refused. Nothing intact: :class:`CheckpointError` naming the
        folder and how to start over.
        """
        if step is not None or which != "last":
            epoch = self._managers[which].latest_step() if step is None else step
            try:
                return self._restore_step(which, template, epoch, step is None)
            except _Damaged as err:
                aside = self._move_aside(which, err.step, err.cause)
                raise CheckpointError(
                    f"the '{which}' checkpoint of {self._unit(which)} {err.step} in "
                    f"{self.directory} is damaged ({err.cause}); it was moved to {aside}. "
                    f"To start the run over, delete {self.directory} (the damaged copy with "
                    "it) and rerun the same command."
                ) from err
        candidates = [("last", s) for s in reversed(self.steps("last"))]
        candidates += [("best", s) for s in reversed(self.steps("best"))]
        moved: list[Path] = []
        for kind, at in candidates:
            try:
                restored = self._restore_step(kind, template, at, False)
            except _Damaged as err:
                moved.append(self._move_aside(kind, at, err.cause))
                continue
            if moved:
                print(
                    f"[qtl] warning: resuming from {kind}/{at} in {self.directory}, the newest "
                    f"intact checkpoint ({len(moved)} damaged one(s) set aside)",
                    file=sys.stderr,
                    flush=True,
                )
            return restored
        if moved:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: every step was damaged and moved "
                f"to {self.directory / DAMAGED}. To start the run over, delete "
                f"{self.directory} and rerun the same command."
            )
        raise CheckpointError(
            f"no 'last' checkpoint in {self.directory} (found: none). The folder was changed "
            "outside qtl; delete the run directory to start the run over."
        )

    def _restore_step(
        self, which: str, template: Any, epoch: int | None, newest: bool
    ) -> tuple[Any, dict[str, Any]]:
        """One step into ``template``; :class:`_Damaged` when its files cannot be read."""
        manager = self._managers[which]
        if epoch is None or epoch not in manager.all_steps():
            wanted = "" if newest else f" of step {epoch}"
            raise CheckpointError(
                f"no '{which}' checkpoint{wanted} in {self.directory} (found: "
                f"{manager.all_steps() or 'none'}). The folder was changed outside qtl; "
                "delete the run directory to start the run over."
            )
        flat_t, paths_t = _flatten(template)
        try:
            meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as err:  # noqa: BLE001 - any unreadable metadata is damage
            raise _Damaged(epoch, err) from err
        if not isinstance(meta, dict) or not isinstance(meta.get("paths"), list):
            raise _Damaged(epoch, ValueError(f"metadata without the state's paths: {meta!r:.80}"))
        if meta["paths"] != paths_t:
            raise CheckpointError(
                f"checkpoint {self.directory / which} holds a different model/optimiser structure "
                "than this run builds (config or code changed). Use a new run directory "
                "(e.g. name=<new experiment name>) or delete that folder to start over."
            )
        abstract = {
            k: jax.ShapeDtypeStruct(
                np.shape(v), getattr(v, "dtype", np.asarray(v).dtype), sharding=self.sharding
            )
            for k, v in flat_t.items()
        }
        try:
            restored = manager.restore(
                epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
            leaves = jax.block_until_ready([restored[k] for k in sorted(restored)])
        except Exception as err:  # noqa: BLE001 - the arrays' files: damaged
            raise _Damaged(epoch, err) from err
        template_leaves, treedef = jax.tree_util.tree_flatten(template)
        wanted = [abstract[k].shape for k in sorted(abstract)]
        if [np.shape(a) for a in leaves] != wanted:
            raise _Damaged(epoch, ValueError("arrays missing or of the wrong shape"))
        leaves = [
            jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(t)) if _is_key(t) else leaf
            for leaf, t in zip(leaves, template_leaves, strict=True)
        ]
        meta.pop("paths", None)
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def _move_aside(self, which: str, step: int, cause: BaseException) -> Path:
        """Move a damaged step to ``<dir>/damaged/`` (kept for a look, out of Orbax's view)."""
        source = self.directory / which / str(step)
        target = self.directory / DAMAGED / f"{which}-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / DAMAGED / f"{which}-{step}.{n}"
        reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
        print(
            f"[qtl] warning: checkpoint {source} is damaged ({type(cause).__name__}: {reason});"
            f" moved to {target}",
            file=sys.stderr,
            flush=True,
        )
        try:
            if is_primary():  # one mover; the run's other processes wait for it
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {source} is damaged and could not be moved aside ({err}); move or "
                "delete it by hand and rerun the same command."
            ) from err
        finally:
            barrier(f"qtl-move-aside-{which}-{step}")
        self._reopen(which)
        return target

    def _reopen(self, which: str) -> None:
        """A fresh manager for ``which``: Orbax caches the step list it found at opening."""
        with contextlib.suppress(Exception):
            self._managers[which].close()
        self._managers[which] = ocp.CheckpointManager(self.directory / which, options=self._options)

    def close(self) -> None:
        """Release the managers; never raises (it runs while another error propagates)."""
        for manager in self._managers.values():
            try:
                manager.close()
            except Exception as err:  # noqa: BLE001
                print(f"[qtl] warning: closing checkpoints: {err}", file=sys.stderr)
