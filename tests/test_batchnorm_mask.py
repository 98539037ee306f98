"""Padding never trains: with ``backbone.batch_norm=batch`` the padded rows of a last partial
batch stay out of BatchNorm's batch statistics and running averages.

The loader pads a partial batch with copies of example 0 (mask 0). Here a padded batch is
compared with the same real rows run on their own: the running statistics, the real rows'
outputs and a whole SGD train step must agree, whatever the padding holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, compose
from flax import nnx

from qtl.config import BackboneConfig, BatchNormMode, LayerType
from qtl.models.resnet import ResNet

REAL, BATCH = 5, 8


def _backbone(batch_norm: BatchNormMode) -> ResNet:
    cfg = BackboneConfig(
        name="tiny",
        layer_type=LayerType.basic,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        batch_norm=batch_norm,
    )
    return ResNet(cfg, rngs=nnx.Rngs(0))


def _functional(model: ResNet):
    """``f(x, mask) -> (features, running statistics after the call)``, model untouched."""
    graph, state = nnx.split(model)

    @jax.jit
    def f(x, mask):
        module = nnx.merge(graph, state, copy=True)
        out = module(x, mask)
        return out, nnx.state(module, nnx.BatchStat)

    return f


@pytest.fixture(scope="module")
def batch_bn():
    """A batch-statistics ResNet in training mode, as a pure function."""
    model = _backbone(BatchNormMode.batch)
    model.train()
    return _functional(model)


@pytest.fixture(scope="module")
def real_rows() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(REAL, 32, 32, 3)).astype(np.float32)


def _pad(real: np.ndarray, padding: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The loader's padding: copies of row 0 (or the given rows) and a 1/0 mask."""
    fill = np.repeat(real[:1], BATCH - len(real), axis=0) if padding is None else padding
    mask = np.zeros(BATCH, np.float32)
    mask[: len(real)] = 1.0
    return np.concatenate([real, fill]), mask


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_running_stats_after_a_padded_batch_equal_the_real_rows_alone(batch_bn, real_rows):
    x, mask = _pad(real_rows)
    out_padded, stats_padded = batch_bn(x, mask)
    out_real, stats_real = batch_bn(real_rows, np.ones(REAL, np.float32))
    assert len(_leaves(stats_padded)) == 2 * 6  # mean and var of each of the 6 batch norms
    for a, b in zip(_leaves(stats_padded), _leaves(stats_real), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_padded)[:REAL], out_real, rtol=1e-5, atol=1e-5)
    # without the mask the padding copies of row 0 do count: the check above can fail
    _, stats_unmasked = batch_bn(x, None)
    assert any(
        not np.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(_leaves(stats_unmasked), _leaves(stats_real), strict=True)
    )


def test_the_stats_are_the_weighted_moments_of_the_real_rows(batch_bn, real_rows):
    """The stem's batch norm sees the stem conv's output; check its update by hand."""
    x, mask = _pad(real_rows)
    model = _backbone(BatchNormMode.batch)
    conv = model.embedder.embedder.convolution
    h = np.asarray(conv(jnp.asarray(real_rows)), np.float64)  # (REAL, H, W, C) real rows only
    n = h.shape[0] * h.shape[1] * h.shape[2]
    mean = h.mean(axis=(0, 1, 2))
    unbiased = h.var(axis=(0, 1, 2)) * n / (n - 1)
    _, stats = batch_bn(x, mask)
    stem = stats["embedder"]["embedder"]["normalization"]
    np.testing.assert_allclose(np.asarray(stem["mean"][...]), 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(stem["var"][...]), 0.9 + 0.1 * unbiased, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("padding", ["noise", "huge", "nan"])
def test_what_the_padding_holds_changes_nothing(batch_bn, real_rows, padding):
    x_ref, mask = _pad(real_rows)
    out_ref, stats_ref = batch_bn(x_ref, mask)
    shape = (BATCH - REAL, *real_rows.shape[1:])
    fill = {
        "noise": np.random.default_rng(1).normal(size=shape) * 5,
        "huge": np.full(shape, 1e30),
        "nan": np.full(shape, np.nan),
    }[padding].astype(np.float32)
    x, _ = _pad(real_rows, fill)
    out, stats = batch_bn(x, mask)
    np.testing.assert_array_equal(np.asarray(out)[:REAL], np.asarray(out_ref)[:REAL])
    for a, b in zip(_leaves(stats), _leaves(stats_ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_all_padding_batch_leaves_the_running_stats_alone(batch_bn, real_rows):
    x, _ = _pad(real_rows)
    _, stats = batch_bn(x, np.zeros(BATCH, np.float32))
    fresh = nnx.state(_backbone(BatchNormMode.batch), nnx.BatchStat)
    for a, b in zip(_leaves(stats), _leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inference_mode_and_eval_mode_ignore_the_mask(real_rows):
    x, mask = _pad(real_rows)
    frozen = _backbone(BatchNormMode.inference)
    frozen.train()  # inference-mode batch norm ignores the switch
    eval_model = _backbone(BatchNormMode.batch)  # built in eval mode: running statistics
    for model in (frozen, eval_model):
        before = _leaves(nnx.state(model, nnx.BatchStat))
        f = _functional(model)
        out_mask, stats = f(x, mask)
        out_none, _ = f(x, None)
        np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(out_none))
        for a, b in zip(_leaves(stats), before, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_padded_train_step_equals_one_on_the_real_rows():
    """The jitted step: BN statistics and SGD-updated weights as if padding did not exist."""
    from qtl.studies.cxr import CxrStudy
    from qtl.studies.pretrain import build_pretrained_model
    from qtl.train.step import init_state, make_steps

    cfg = compose(
        *TINY,
        "head=cdl",
        "backbone.pretrained=null",
        "backbone.batch_norm=batch",
        "data.augment=false",
        "train.optimizer=sgd",
        "train.lr=0.05",
    )
    model = build_pretrained_model(cfg, 0, CxrStudy())
    steps = make_steps(model, cfg)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (REAL, 32, 32), dtype=np.uint8)
    labels = (rng.uniform(size=(REAL, 8)) < 0.3).astype(np.float32)
    pad_x, mask = _pad(images)
    pad_y, _ = _pad(labels)
    key = jax.random.key(0)

    def fresh():  # the step donates its state: a copy each time
        return jax.tree.map(jnp.copy, init_state(model, cfg, steps.tx))

    initial = _leaves(fresh().rest)
    padded, loss_p = steps.train_step(fresh(), pad_x, pad_y, mask, key)
    alone, loss_r = steps.train_step(fresh(), images, labels, np.ones(REAL, np.float32), key)
    assert float(loss_p) == pytest.approx(float(loss_r), rel=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(alone.rest), initial, strict=True))
    for a, b in zip(_leaves(padded.rest), _leaves(alone.rest), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_leaves(padded.params), _leaves(alone.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
