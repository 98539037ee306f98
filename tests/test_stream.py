"""The batch stream is a function of the seed alone: same seed => same batches for every head."""

from __future__ import annotations

import jax
import numpy as np

from qtl.data.augment import augment
from qtl.data.loader import batches, epoch_order


def _stream(seed, epoch=1, n=50, bs=16):
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), np.uint8)
    labels = np.eye(n, 3, dtype=np.float32)
    return list(batches(images, labels, bs, seed=seed, epoch=epoch))


def test_same_seed_same_order_and_keys():
    a, b = _stream(3), _stream(3)
    assert len(a) == 4  # 50 / 16 -> last batch partial
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(jax.random.key_data(x.key), jax.random.key_data(y.key))


def test_other_seed_or_epoch_changes_stream():
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(4, 1, 50))
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 2, 50))


def test_partial_batch_is_padded_and_masked():
    last = _stream(0)[-1]
    assert last.images.shape[0] == 16 and last.mask.sum() == 50 - 3 * 16
    assert set(np.concatenate([b.indices[b.mask > 0] for b in _stream(0)])) == set(range(50))


def test_unshuffled_eval_order():
    images = np.zeros((5, 4, 4), np.uint8)
    out = list(batches(images, np.zeros((5, 2), np.float32), 2))
    assert [list(b.indices[b.mask > 0]) for b in out] == [[0, 1], [2, 3], [4]]
    assert all(b.key is None for b in out)


def test_augment_is_deterministic_per_key_and_bounded():
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32)) * 255
    k = jax.random.key(7)
    a = np.asarray(jax.jit(augment)(x, k))
    np.testing.assert_array_equal(a, np.asarray(jax.jit(augment)(x, k)))
    assert not np.array_equal(a, np.asarray(jax.jit(augment)(x, jax.random.key(8))))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255.01


def test_rotation_is_degrees_not_radians():
    """+-15 degrees keeps a centred horizontal bar nearly horizontal (radians would not)."""
    img = np.zeros((1, 65, 65), np.float32)
    img[0, 30:35, 8:57] = 255.0
    for seed in range(8):
        out = np.asarray(augment(img, jax.random.key(seed), hflip_p=0.0))[0]
        rows = np.where(out.max(axis=1) > 128)[0]
        # a 49-px bar rotated by <= 15 deg spans at most ~5 + 49*sin(15deg) ~ 18 rows
        assert rows.max() - rows.min() <= 19, seed


def test_flip_probability_one_flips():
    img = np.zeros((2, 8, 8), np.float32)
    img[:, :, 0] = 255
    out = np.asarray(augment(img, jax.random.key(0), hflip_p=1.0, max_rotation_deg=0.0))
    assert (out[:, :, -1] == 255).all() and (out[:, :, 0] == 0).all()


def test_wait_clock_counts_only_time_blocked_on_the_stream():
    import time

    from qtl.data.loader import WaitClock

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    clock = WaitClock()
    t0 = time.perf_counter()
    for _ in clock.wrap(slow()):
        time.sleep(0.05)  # the consumer's own work is not waiting
    total = time.perf_counter() - t0
    assert 0.15 <= clock.seconds < total - 0.1
