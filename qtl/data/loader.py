"""The batch stream: which examples, in which order, with which augmentation key.

Everything here is a function of (seed, epoch, batch index) alone, never of the head or the
model, so CDL and DQC runs with the same seed see the same batches. The last partial batch is
padded to full size with a zero mask, so one compiled train step serves every batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np


@dataclass(frozen=True)
class Batch:
    """One padded batch: uint8 images, float labels, 1/0 mask of real rows, indices."""

    images: np.ndarray  # (B, H, W) uint8
    labels: np.ndarray  # (B, L) float32
    mask: np.ndarray  # (B,) float32, 0 on padding rows
    indices: np.ndarray  # (B,) int64 example indices (padding repeats index 0)
    key: jax.Array | None  # augmentation key (training batches only)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation of ``range(n)`` for one epoch (NumPy's PCG64 seeded by (seed, epoch))."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@jax.jit
def _augment_key(seed: jax.Array, epoch: jax.Array, index: jax.Array) -> jax.Array:
    root = jax.random.fold_in(jax.random.key(seed), 0x5EED)
    return jax.random.fold_in(jax.random.fold_in(root, epoch), index)


def augment_key(seed: int, epoch: int, index: int) -> jax.Array:
    """Augmentation key of batch ``index`` of ``epoch`` (independent of model init).

    Compiled: one dispatch per batch instead of four eager ops (~30x cheaper on CPU).
    """
    return _augment_key(np.uint32(seed), np.uint32(epoch), np.uint32(index))


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _pad(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(batch_size, np.float32)
    mask[: len(indices)] = 1.0
    padded = np.zeros(batch_size, np.int64)
    padded[: len(indices)] = indices
    return padded, mask


def batches(
    images: Any,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    prefetch: int = 2,
    transform: Callable[[np.ndarray, jax.Array], np.ndarray] | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """Yield padded batches; with ``seed`` shuffled and keyed for training, else in order.

    ``images`` is an (N, H, W) uint8 array or anything indexable like one (the image cache's
    ``CachedImages``). A background thread gathers the next ``prefetch`` batches while the
    device computes; ``transform(images, key)`` (host augmentation) runs in that thread too.
    ``rows``: only these rows ``[start, stop)`` of every (global) batch are read - one
    process's share of a run over several processes; the order and keys stay the global ones.
    """
    n = len(images)
    order = epoch_order(seed, epoch, n) if seed is not None else np.arange(n)
    count = num_batches(n, batch_size)

    def make(i: int) -> Batch:
        idx, mask = _pad(order[i * batch_size : (i + 1) * batch_size], batch_size)
        if rows is not None:
            idx, mask = idx[rows[0] : rows[1]], mask[rows[0] : rows[1]]
        key = augment_key(seed, epoch, i) if seed is not None else None
        x = images[idx]
        if transform is not None and key is not None:
            x = transform(x, key)
        return Batch(x, labels[idx], mask, idx, key)

    if prefetch <= 0:
        for i in range(count):
            yield make(i)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def worker() -> None:
        try:
            for i in range(count):
                if stop.is_set():
                    return
                q.put(make(i))
        except BaseException as exc:  # surfaced in the consumer thread
            q.put(exc)
        q.put(None)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class WaitClock:
    """Time the consumer spends blocked on the next batch: ~0 means the train step never
    waits for data (the prefetch thread keeps ahead)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, items: Iterator[Batch]) -> Iterator[Batch]:
        items = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t0
            yield item
