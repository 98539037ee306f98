"""Orbax checkpoints of the train state: the last epoch (to resume) and the best (to evaluate).

The state is saved as a flat dict of arrays keyed by position, with the pytree paths in the
JSON metadata; restore rebuilds it in the structure of a freshly initialised state, after
checking that every path and shape agrees. That keeps checkpoints independent of how
Flax/optax register their pytree classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the run's model (different config or code)."""


def _flatten(tree: Any) -> tuple[dict[str, Any], list[str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    return {f"{i:05d}": leaf for i, (_, leaf) in enumerate(leaves)}, paths


class Checkpoints:
    """``<dir>/last`` and ``<dir>/best``, one step kept in each."""

    def __init__(self, directory: Path):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._managers = {
            name: ocp.CheckpointManager(self.directory / name, options=options)
            for name in ("last", "best")
        }

    def save(self, which: str, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Save and wait: a checkpoint that is reported saved is on disk."""
        flat, paths = _flatten(state)
        manager = self._managers[which]
        manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave({**meta, "paths": paths})
            ),
            force=True,
        )
        manager.wait_until_finished()

    def latest_epoch(self, which: str) -> int | None:
        return self._managers[which].latest_step()

    def restore(self, which: str, template: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into the structure of ``template`` (a state built the same way)."""
        manager = self._managers[which]
        epoch = manager.latest_step()
        if epoch is None:
            raise CheckpointError(f"no '{which}' checkpoint in {self.directory}")
        flat_t, paths_t = _flatten(template)
        meta = manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("paths") != paths_t:
            raise CheckpointError(
                f"checkpoint {self.directory / which} holds a different model/optimiser structure "
                "than this run builds (config or code changed). Use a new run directory "
                "(e.g. name=<new experiment name>) or delete that folder to start over."
            )
        abstract = {
            k: jax.ShapeDtypeStruct(np.shape(v), getattr(v, "dtype", np.asarray(v).dtype))
            for k, v in flat_t.items()
        }
        restored = manager.restore(
            epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        leaves = [restored[k] for k in sorted(restored)]
        treedef = jax.tree_util.tree_structure(template)
        meta.pop("paths", None)
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
