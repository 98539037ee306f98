"""Data parallelism over a device mesh: the batch split over devices, the state replicated.

JAX's own SPMD partitioner does the work: the jitted step is unchanged and, given a batch
sharded along its first axis and a replicated state, XLA computes the same global-batch
program on every device and inserts the gradient all-reduce. So batch-norm statistics, the
masked loss of a padded batch and every mean are over the global batch exactly as on one
device; only the order of float32 additions in those reductions differs (see
``tests/test_devices.py`` for the tolerance this implies).

Parameters and optimizer state are replicated, not sharded: the largest model here
(ResNet-50, 23.5 M parameters, ~280 MB with Adam's moments) fits every device many times over,
and replication keeps the update free of gathers. One device (``train.devices=1``, the
default) bypasses all of this, so a single-device run is today's program, bit for bit.

Several processes (``train.processes``, ``qtl.utils.distributed``): the mesh spans
``train.devices`` devices of every process, in process order, so process ``p`` holds the
``p``-th contiguous block of rows of every global batch. Each process loads only that block
(:meth:`Topology.rows`) and the global array is assembled from the blocks without copying
(``jax.make_array_from_process_local_data``); the program is the same global-batch program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qtl.config import ConfigError

AXIS = "data"


class DevicesError(ConfigError):
    """More devices asked for than this process sees, or a batch they cannot split."""


@dataclass(frozen=True)
class Topology:
    """The devices one run trains on; ``mesh`` is None for a single device.

    ``processes``/``index``: how many processes share the mesh and which one this is.
    """

    mesh: Mesh | None = None
    processes: int = 1
    index: int = 0

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def describe(self) -> dict[str, Any]:
        """What the run record keeps of each attempt's topology (``devices``: all of them,
        over every process)."""
        devices = jax.devices() if self.mesh is None else list(self.mesh.devices.flat)
        first = devices[0]
        return {
            "devices": self.size,
            "platform": first.platform,
            "device_kind": str(first.device_kind),
            "processes": jax.process_count(),
        }

    def rows(self, batch_size: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a global batch this process loads."""
        per = batch_size // self.processes
        return self.index * per, (self.index + 1) * per

    def shard(self, *arrays: Any) -> tuple[Any, ...]:
        """Place batch arrays split along axis 0 (None passes through); with several
        processes each passes its own rows (:meth:`rows`) of the global batch."""
        if self.mesh is None:
            return arrays
        spec = NamedSharding(self.mesh, PartitionSpec(AXIS))
        if self.processes == 1:
            return tuple(None if a is None else jax.device_put(a, spec) for a in arrays)
        return tuple(
            None
            if a is None
            else jax.make_array_from_process_local_data(
                spec, np.asarray(a), (np.shape(a)[0] * self.processes, *np.shape(a)[1:])
            )
            for a in arrays
        )

    def replicated(self) -> NamedSharding | None:
        """The sharding of a value held whole by every device (None: one device)."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree: Any) -> Any:
        """Place a pytree (the train state, a key) whole on every device; with several
        processes every process passes the same values (the same seed made them)."""
        if self.mesh is None:
            return tree
        spec = NamedSharding(self.mesh, PartitionSpec())
        if self.processes == 1:
            return jax.device_put(tree, spec)
        return jax.tree.map(lambda leaf: _global(leaf, spec), tree)

    def gather(self, x: Any) -> np.ndarray:
        """A batch-sharded result as one host array of the whole batch, on every process."""
        if self.processes == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global(leaf: Any, spec: NamedSharding) -> Any:
    """One replicated global array from a value every process holds alike."""
    if isinstance(leaf, jax.Array) and leaf.sharding == spec:
        return leaf
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        data = _global(jax.random.key_data(leaf), spec)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, spec, lambda index: host[index])


def resolve(devices: int | str, batch_sizes: Sequence[tuple[str, int]] = ()) -> Topology:
    """The topology for ``train.devices`` (an int or ``all``: devices of each process),
    checked against the machine.

    Refused (exit 2), before any work: more devices than this process sees, or a batch size
    the devices of all processes do not divide (every device must hold the same number of
    rows; pad the batch size up rather than have qtl change the global batch, which would
    change the run).
    """
    seen = jax.local_devices()
    processes, index = jax.process_count(), jax.process_index()
    if isinstance(devices, str):
        if devices.strip().lower() != "all":
            raise DevicesError(f"train.devices={devices!r}: expected a positive integer or 'all'")
        n = len(seen)
    else:
        n = int(devices)
    if n < 1:
        raise DevicesError(f"train.devices={devices}: expected a positive integer or 'all'")
    if n > len(seen):
        kind = seen[0].platform.upper()
        raise DevicesError(
            f"train.devices={n} but this process sees {len(seen)} {kind} device(s) "
            f"({', '.join(str(d) for d in seen[:8])}). Ask for at most {len(seen)}, or give the "
            "job more devices (CPU tests: XLA_FLAGS=--xla_force_host_platform_device_count=N)."
        )
    total = n * processes
    over = f"train.devices={n}" + (f" x train.processes={processes}" if processes > 1 else "")
    for name, size in batch_sizes:
        if size % total:
            raise DevicesError(
                f"{name}={size} does not split over {over}: every device takes the "
                f"same number of rows; use a multiple of {total} "
                f"(e.g. {size + total - size % total})."
            )
    if total == 1:
        return Topology()
    if processes == 1:
        return Topology(Mesh(np.asarray(seen[:n]), (AXIS,)))
    by_process: dict[int, list[Any]] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    chosen = [d for p in sorted(by_process) for d in by_process[p][:n]]
    return Topology(Mesh(np.asarray(chosen), (AXIS,)), processes=processes, index=index)
