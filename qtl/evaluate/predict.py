"""Run the jitted eval step over a whole split (padded last batch, same compiled shape)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qtl.data.loader import batches, num_batches
from qtl.progress import bar


def predict(
    eval_step: Callable,
    state,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    desc: str = "eval",
    progress: bool = False,
    shard: Callable[..., tuple] | None = None,
    rows: tuple[int, int] | None = None,
    gather: Callable[[object], np.ndarray] = np.asarray,
) -> tuple[np.ndarray, float]:
    """Scores (N, outputs) and the mean loss over the split (BCE for the CXR study).

    ``shard`` places each batch's arrays on the run's devices (``Topology.shard``); None
    leaves them to JAX's default placement. Several processes: each reads its ``rows`` of
    every batch and ``gather`` (``Topology.gather``) brings the whole batch's scores back.
    """
    n = len(images)
    probs: np.ndarray | None = None  # its width is the model's output width
    total = 0.0
    done = 0
    with bar(total=num_batches(n, batch_size), desc=desc, enabled=progress, leave=False) as pbar:
        for i, batch in enumerate(batches(images, labels, batch_size, rows=rows)):
            arrays = (batch.images, batch.labels, batch.mask)
            p, loss_sum = eval_step(state, *(shard(*arrays) if shard else arrays))
            real = min(batch_size, n - i * batch_size)  # rows of the whole batch
            if probs is None:
                probs = np.zeros((n, np.shape(p)[-1]), np.float32)
            probs[done : done + real] = gather(p)[:real]
            total += float(loss_sum)
            done += real
            pbar.update(1)
    if probs is None:
        probs = np.zeros(labels.shape, np.float32)
    return probs, total / max(n, 1)
