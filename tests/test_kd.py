"""Label losses per task type and the knowledge-distillation loss against hand computations."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl.config import DistillConfig
from qtl.data.medmnist_info import INFO, Task
from qtl.train.objectives import (
    distill_loss,
    label_loss,
    n_outputs,
    probabilities,
    soft_term,
)

RNG = np.random.default_rng(0)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_outputs_per_task():
    assert n_outputs(INFO["retinamnist"]) == 5 and n_outputs(INFO["chestmnist"]) == 14
    assert n_outputs(INFO["breastmnist"]) == 1 and n_outputs(INFO["breastmnist"], 2) == 2
    with pytest.raises(ValueError, match="binary_logits=3"):
        n_outputs(INFO["breastmnist"], 3)


@pytest.mark.parametrize("task", [Task.multi_class, Task.ordinal])
def test_softmax_cross_entropy_by_hand(task):
    z = RNG.normal(size=(6, 5))
    y = RNG.integers(0, 5, (6, 1))
    hand = -np.mean(_log_softmax(z)[np.arange(6), y[:, 0]])
    assert float(label_loss(task, jnp.asarray(z), jnp.asarray(y))) == pytest.approx(hand, 1e-5)


def test_binary_one_logit_bce_and_two_logit_ce_by_hand():
    y = np.array([[0], [1], [1], [0]])
    z1 = RNG.normal(size=(4, 1))
    p = _sigmoid(z1[:, 0])
    hand = -np.mean(y[:, 0] * np.log(p) + (1 - y[:, 0]) * np.log(1 - p))
    assert float(label_loss("binary", jnp.asarray(z1), jnp.asarray(y))) == pytest.approx(hand, 1e-5)
    z2 = RNG.normal(size=(4, 2))
    hand2 = -np.mean(_log_softmax(z2)[np.arange(4), y[:, 0]])
    assert float(label_loss("binary", jnp.asarray(z2), jnp.asarray(y))) == pytest.approx(
        hand2, 1e-5
    )
    # the metric's column (the last) is the positive-class probability either way
    np.testing.assert_allclose(probabilities("binary", jnp.asarray(z1))[:, -1], p, rtol=1e-5)
    np.testing.assert_allclose(
        probabilities("binary", jnp.asarray(z2))[:, -1], np.exp(_log_softmax(z2))[:, 1], rtol=1e-5
    )


def test_multi_label_bce_by_hand_and_mask():
    z = RNG.normal(size=(5, 14))
    y = (RNG.uniform(size=(5, 14)) < 0.3).astype(np.int32)
    p = _sigmoid(z)
    per_row = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1)
    got = float(label_loss("multi-label", jnp.asarray(z), jnp.asarray(y)))
    assert got == pytest.approx(per_row.mean(), 1e-5)
    mask = np.array([1, 1, 0, 1, 0], np.float32)  # rows 2 and 4 are padding
    masked = float(label_loss("multi-label", jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask)))
    assert masked == pytest.approx(per_row[[0, 1, 3]].mean(), 1e-5)


def test_kd_softmax_by_hand():
    """alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE, numbers written out."""
    s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    y = np.array([[0], [2]])
    temp, alpha = 2.0, 0.7
    pt = np.exp(_log_softmax(t / temp))
    kl = np.sum(pt * (_log_softmax(t / temp) - _log_softmax(s / temp)), axis=1).mean()
    ce = -np.mean(_log_softmax(s)[np.arange(2), y[:, 0]])
    hand = alpha * temp**2 * kl + (1 - alpha) * ce
    got = distill_loss(
        "multi-class", jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature=temp, alpha=alpha
    )
    assert float(got) == pytest.approx(hand, rel=1e-5)
    # row 0 by hand to the digit: softmax([1, .5, 0]) vs softmax([.5, 0, -.5]) at T = 2
    a = np.exp([1.0, 0.5, 0.0]) / np.exp([1.0, 0.5, 0.0]).sum()
    b = np.exp([0.5, 0.0, -0.5]) / np.exp([0.5, 0.0, -0.5]).sum()
    row0 = float(np.sum(a * np.log(a / b)))
    one = soft_term("multi-class", jnp.asarray(s[:1]), jnp.asarray(t[:1]), temp)
    assert float(one) == pytest.approx(4 * row0, rel=1e-5)


def test_kd_multi_label_is_per_label_sigmoid_kl():
    s = RNG.normal(size=(3, 14))
    t = RNG.normal(size=(3, 14))
    y = (RNG.uniform(size=(3, 14)) < 0.3).astype(np.int32)
    temp, alpha = 3.0, 0.5
    q, p = _sigmoid(s / temp), _sigmoid(t / temp)
    bce_soft = -(p * np.log(q) + (1 - p) * np.log(1 - q))  # BCE against teacher probabilities
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    soft = temp**2 * np.mean(bce_soft - entropy)
    ps = _sigmoid(s)
    hard = -np.mean(y * np.log(ps) + (1 - y) * np.log(1 - ps))
    got = distill_loss(
        "multi-label", jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature=temp, alpha=alpha
    )
    assert float(got) == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-5)


@pytest.mark.parametrize("task,k", [("multi-class", 4), ("multi-label", 3), ("binary", 1)])
def test_kd_is_zero_at_the_teacher_and_has_the_soft_target_gradient(task, k):
    """KL form: zero when the student equals the teacher; its gradient is that of the soft-
    target cross-entropy (they differ by the teacher's entropy, a constant)."""
    t = jnp.asarray(RNG.normal(size=(4, k)), jnp.float32)
    assert float(soft_term(task, t, t, 2.5)) == pytest.approx(0.0, abs=1e-6)
    s = jnp.asarray(RNG.normal(size=(4, k)), jnp.float32)

    def soft_ce(s):
        if task == "multi-class":
            p = jax.nn.softmax(t / 2.5)
            return 2.5**2 * -jnp.mean(jnp.sum(p * jax.nn.log_softmax(s / 2.5), -1))
        p = jax.nn.sigmoid(t / 2.5)
        q = s / 2.5
        return 2.5**2 * jnp.mean(-(p * jax.nn.log_sigmoid(q) + (1 - p) * jax.nn.log_sigmoid(-q)))

    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda s: soft_term(task, s, t, 2.5)))(s),
        jax.jit(jax.grad(soft_ce))(s),
        atol=1e-6,
    )
    # the teacher gets no gradient
    g_teacher = jax.jit(jax.grad(lambda t: soft_term(task, s, t, 2.5)))(t)
    np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)


def test_kd_alpha_ends_and_errors():
    s = jnp.asarray(RNG.normal(size=(4, 3)))
    t = jnp.asarray(RNG.normal(size=(4, 3)))
    y = jnp.asarray(RNG.integers(0, 3, (4, 1)))
    kw = {"temperature": 4.0}
    assert float(distill_loss("ordinal", s, t, y, alpha=0.0, **kw)) == pytest.approx(
        float(label_loss("ordinal", s, y))
    )
    assert float(distill_loss("ordinal", s, t, y, alpha=1.0, **kw)) == pytest.approx(
        float(soft_term("ordinal", s, t, 4.0))
    )
    with pytest.raises(ValueError, match="distill.alpha=1.5"):
        distill_loss("ordinal", s, t, y, alpha=1.5, **kw)
    with pytest.raises(ValueError, match="distill.temperature=0"):
        distill_loss("ordinal", s, t, y, alpha=0.5, temperature=0)
    with pytest.raises(ValueError, match="teacher logits"):
        soft_term("ordinal", s, t[:, :2], 2.0)


@pytest.mark.parametrize("mode", ["none", "joint", "pretrain"])
def test_distill_yaml_drafts_fit_the_schema(tmp_path, mode):
    import shutil

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    shutil.copytree(Path(__file__).resolve().parents[1] / "conf" / "distill", tmp_path / "distill")
    (tmp_path / "config.yaml").write_text(f"defaults:\n  - distill: {mode}\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        loaded = compose(config_name="config").distill
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistillConfig), loaded))
    assert cfg.mode == mode and cfg == DistillConfig(mode=mode)
    # and the study's own check (what a run does at start) accepts each draft as composed
    from helpers import compose as compose_real

    from qtl.studies import study_for

    full = compose_real("debug=tiny_medmnist", "model=vit", f"distill={mode}")
    study_for(full).validate(full)
    with pytest.raises(ValueError, match="distill.alpha=1.5 is out of range"):
        bad = compose_real(
            "debug=tiny_medmnist", "model=vit", f"distill={mode}", "distill.alpha=1.5"
        )
        study_for(bad).validate(bad)
