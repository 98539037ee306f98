"""One augmentation, two implementations: dm-pix on the device and OpenCV in the loader threads
apply the same draws and agree except at the border and for the host's rounding to uint8."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import jax
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from qtl.config import AugmentOn, DataConfig, DataName
from qtl.data.augment import augment, augment_host, draw, placement


def _images(n: int = 16, size: int = 96) -> np.ndarray:
    g = gaussian_filter(np.random.default_rng(0).random((n, size, size)), (0, 2, 2))
    return ((g - g.min()) / (g.max() - g.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("hflip_p,max_deg", [(0.5, 15.0), (1.0, 0.0), (0.0, 15.0)])
def test_host_equals_device_inside_the_rotation_disk(hflip_p, max_deg):
    x = _images()
    key = jax.random.key(11)
    kw = {"hflip_p": hflip_p, "max_rotation_deg": max_deg}
    device = np.asarray(jax.jit(lambda a, k: augment(a, k, **kw))(x.astype(np.float32), key))
    host = augment_host(x, key, **kw)
    assert host.dtype == np.uint8 and host.shape == x.shape
    diff = np.abs(device - host.astype(np.float32))
    h = x.shape[1]
    yy, xx = np.mgrid[:h, :h]
    inside = np.hypot(yy - (h - 1) / 2, xx - (h - 1) / 2) < h / 2 - 2  # never samples past the edge
    assert diff[:, inside].max() <= 0.51  # the same bilinear values, rounded to uint8
    if max_deg == 0:
        np.testing.assert_array_equal(host, device)  # pure flips are exact everywhere
    else:
        assert diff[:, inside].mean() < 0.3
        assert (diff > 1).mean() < 0.05  # only the border differs
    flips, degrees = map(np.asarray, draw(key, len(x), hflip_p=hflip_p, max_rotation_deg=max_deg))
    if hflip_p == 0.5:
        assert 0 < flips.sum() < len(x)  # both kinds of draw happen, identically on both paths
    assert np.abs(degrees).max() <= max_deg


def test_flip_and_rotation_direction_match_on_an_asymmetric_image():
    """A bright block top-left, rotated and flipped: both paths put it in the same place."""
    x = np.zeros((1, 64, 64), np.uint8)
    x[0, 8:24, 8:20] = 250
    for seed in range(6):
        key = jax.random.key(seed)
        dev = np.asarray(augment(x.astype(np.float32), key, hflip_p=0.5))
        host = augment_host(x, key, hflip_p=0.5)
        for a in (dev, host):
            assert a[0].sum() > 0
        centre = [np.argwhere(a[0] > 125).mean(axis=0) for a in (dev, host)]
        np.testing.assert_allclose(centre[0], centre[1], atol=0.6)


def test_thread_pool_gives_the_same_batch():
    x = _images(8, 64)
    key = jax.random.key(3)
    with ThreadPoolExecutor(2) as pool:
        np.testing.assert_array_equal(augment_host(x, key, pool=pool), augment_host(x, key))


def test_placement():
    data = DataConfig(name=DataName.synthetic)
    assert placement(data) == ("host" if jax.default_backend() == "cpu" else "device")
    assert placement(replace(data, augment_on=AugmentOn.device)) == "device"
    assert placement(replace(data, augment_on=AugmentOn.host)) == "host"
    assert placement(replace(data, augment=False)) is None
    assert placement(replace(data, hflip_p=0.0, max_rotation_deg=0.0)) is None
