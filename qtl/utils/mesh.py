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
    """The devices one run trains on; ``mesh`` is None for a single device."""

    mesh: Mesh | None = None

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def describe(self) -> dict[str, Any]:
        """What the run record keeps of each attempt's topology."""
        devices = jax.devices() if self.mesh is None else list(self.mesh.devices.flat)
        first = devices[0]
        return {
            "devices": self.size,
            "platform": first.platform,
            "device_kind": str(first.device_kind),
            "processes": jax.process_count(),
        }

    def shard(self, *arrays: Any) -> tuple[Any, ...]:
        """Place batch arrays split along axis 0 (None passes through)."""
        if self.mesh is None:
            return arrays
        spec = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return tuple(None if a is None else jax.device_put(a, spec) for a in arrays)

    def replicate(self, tree: Any) -> Any:
        """Place a pytree (the train state, a key) whole on every device."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))


def resolve(devices: int | str, batch_sizes: Sequence[tuple[str, int]] = ()) -> Topology:
    """The topology for ``train.devices`` (an int or ``all``), checked against the machine.

    Refused (exit 2), before any work: more devices than seen, or a batch size the devices
    do not divide (every device must hold the same number of rows; pad the batch size up
    rather than have qtl change the global batch, which would change the run).
    """
    seen = jax.devices()
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
    for name, size in batch_sizes:
        if size % n:
            raise DevicesError(
                f"{name}={size} does not split over train.devices={n}: every device takes the "
                f"same number of rows; use a multiple of {n} (e.g. {size + n - size % n})."
            )
    if n == 1:
        return Topology()
    return Topology(Mesh(np.asarray(seen[:n]), (AXIS,)))
