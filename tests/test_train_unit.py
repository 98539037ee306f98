"""Training pieces in isolation: masked loss, per-group learning rates, checkpoint round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, compose

from qtl.studies.cxr import CxrStudy
from qtl.studies.pretrain import build_pretrained_model
from qtl.train.checkpoint import CheckpointError, Checkpoints
from qtl.train.step import init_state, make_steps, masked_bce


def test_masked_bce_ignores_padding_rows():
    logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [9.0, 9.0]])
    labels = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    mask = jnp.array([1.0, 1.0, 0.0])
    expected = optax.sigmoid_binary_cross_entropy(logits[:2], labels[:2]).mean()
    assert float(masked_bce(logits, labels, mask)) == pytest.approx(float(expected), rel=1e-6)


def _state(*overrides):
    cfg = compose(*TINY, "backbone.pretrained=null", *overrides)
    model = build_pretrained_model(cfg, 0, CxrStudy())
    steps = make_steps(model, cfg)
    return cfg, steps, init_state(model, cfg, steps.tx)


def test_backbone_lr_applies_to_backbone_only():
    _, steps, state = _state("train.lr=1e-2", "train.backbone_lr=1e-4")
    ones = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = steps.tx.update(ones, state.opt_state, state.params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        rate = 1e-4 if jax.tree_util.keystr(path).startswith("['backbone']") else 1e-2
        assert float(jnp.abs(u).max()) == pytest.approx(rate, rel=1e-3), path


def test_train_step_updates_params_not_frozen_stats():
    cfg, steps, state = _state("backbone.batch_norm=inference")
    before = jax.tree.map(np.asarray, (state.params, state.rest))
    images = np.random.default_rng(0).integers(0, 255, (16, 32, 32), dtype=np.uint8)
    labels = np.zeros((16, 8), np.float32)
    labels[::3, 2] = 1
    state, loss = steps.train_step(
        state, images, labels, np.ones(16, np.float32), jax.random.key(0)
    )
    assert np.isfinite(float(loss)) and int(state.step) == 1
    new_params = jax.tree.leaves(state.params)
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before[0]), new_params, strict=True)
    ]
    assert all(changed)
    for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(state.rest), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # inference-mode BN: stats untouched


def test_checkpoint_roundtrip_and_structure_guard(tmp_path):
    _, _, state = _state()
    ckpts = Checkpoints(tmp_path / "ck")
    ckpts.save("last", 3, state, {"epoch": 3, "history": [{"epoch": 1}]})
    restored, meta = ckpts.restore("last", state)
    assert meta["epoch"] == 3 and ckpts.latest_epoch("last") == 3
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, other = _state("head=cdl")
    with pytest.raises(CheckpointError, match="different model"):
        ckpts.restore("last", other)
    ckpts.close()
