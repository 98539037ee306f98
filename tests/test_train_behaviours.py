"""Training behaviours that a config switch promises: early stopping (patience, min_delta),
a frozen backbone, the adamw/sgd optimisers, device augmentation through the jitted step, the
evaluation loss, and a resume after the code's config gained a field. Tiny sizes, real runs
where the behaviour lives in the loop, the jitted step where it lives there."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, compose
from helpers import read_metrics as _metrics

from qtl.apps.train import train_and_evaluate
from qtl.evaluate.predict import predict
from qtl.studies.cxr import CxrStudy
from qtl.studies.pretrain import build_pretrained_model
from qtl.train.checkpoint import Checkpoints
from qtl.train.step import init_state, make_steps

pytestmark = pytest.mark.slow

BATCH, REAL, PX, LABELS = 16, 11, 32, 8


def _tiny(synth_root: Path, *extra: str):
    return compose(*TINY, f"data.root={synth_root}", *extra)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _template(cfg):
    model = build_pretrained_model(cfg, cfg.seed, CxrStudy())
    steps = make_steps(model, cfg)
    return model, init_state(model, cfg, steps.tx)


def _restore(cfg, run_dir: Path, which: str):
    _, template = _template(cfg)
    ckpts = Checkpoints(run_dir / "checkpoints")
    try:
        return ckpts.restore(which, template)[0], ckpts.latest_epoch(which)
    finally:
        ckpts.close()


# --- the loop ----------------------------------------------------------------------------------


def test_early_stopping_stops_and_evaluates_the_best_epoch(synth_root, tmp_path):
    """min_delta larger than any improvement: only epoch 1 counts as one, so patience=2 ends
    the run after epoch 3 of 6, and the test numbers come from epoch 1's checkpoint."""
    cfg = _tiny(
        synth_root, "head=cdl", "train.max_epochs=6", "train.patience=2", "train.min_delta=10"
    )
    run_dir = tmp_path / "run"
    res = train_and_evaluate(cfg, run_dir)
    assert (res["epochs"], res["best_epoch"], res["stopped"]) == (3, 1, "early_stopping")
    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["best"] for r in rows] == [True, False, False]
    assert res["best_val_loss"] == rows[0]["val_loss"]
    # the evaluation ran on epoch 1's weights: its val loss is epoch 1's, not epoch 3's
    assert res["loss"]["val"] == pytest.approx(rows[0]["val_loss"], rel=1e-6)
    assert abs(rows[2]["val_loss"] - rows[0]["val_loss"]) > 1e-4
    best, best_epoch = _restore(cfg, run_dir, "best")
    last, _ = _restore(cfg, run_dir, "last")
    assert best_epoch == 1
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(best.params), _leaves(last.params), strict=True)
    )


def test_without_min_delta_patience_alone_decides(synth_root, tmp_path):
    """patience larger than the budget: the run goes to max_epochs and says so."""
    cfg = _tiny(synth_root, "head=cdl", "train.max_epochs=2", "train.patience=5")
    res = train_and_evaluate(cfg, tmp_path / "run")
    assert (res["epochs"], res["stopped"]) == (2, "max_epochs")


def test_frozen_backbone_is_bit_identical_after_training(synth_root, tmp_path):
    """backbone.freeze=true with batch-statistics BN: neither weights nor running statistics
    move; the head does."""
    cfg = _tiny(
        synth_root,
        "head=cdl",
        "backbone.pretrained=null",
        "backbone.freeze=true",
        "backbone.batch_norm=batch",
        "train.max_epochs=1",
    )
    run_dir = tmp_path / "run"
    train_and_evaluate(cfg, run_dir)
    _, initial = _template(cfg)
    trained, _ = _restore(cfg, run_dir, "last")
    assert int(trained.step) == -(-96 // 16)
    before = {"params": initial.params, "rest": initial.rest}
    after = {"params": trained.params, "rest": trained.rest}
    backbone_leaves = 0
    for part in ("params", "rest"):
        flat_before = dict(jax.tree_util.tree_leaves_with_path(before[part]))
        for path, value in jax.tree_util.tree_leaves_with_path(after[part]):
            name = jax.tree_util.keystr(path)
            if name.startswith("['backbone']"):
                backbone_leaves += 1
                np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_before[path]))
            else:
                assert not np.array_equal(np.asarray(value), np.asarray(flat_before[path])), name
    assert backbone_leaves > 20  # kernels, scales, biases and BN statistics were all compared


# --- the jitted step ---------------------------------------------------------------------------


def _batch(seed: int = 0, border: int = 0):
    """A padded batch of smooth uint8 images (zero outside a centred disk when ``border``)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = gaussian_filter(rng.random((BATCH, PX, PX)), (0, 1.5, 1.5))
    images = ((g - g.min()) / (g.max() - g.min()) * 255).astype(np.uint8)
    if border:
        yy, xx = np.mgrid[:PX, :PX]
        c = (PX - 1) / 2
        images[:, np.hypot(yy - c, xx - c) > PX / 2 - border] = 0
    labels = (rng.uniform(size=(BATCH, LABELS)) < 0.3).astype(np.float32)
    mask = np.zeros(BATCH, np.float32)
    mask[:REAL] = 1.0
    images[REAL:], labels[REAL:] = images[0], labels[0]  # the loader's padding: example 0
    return images, labels, mask


def _steps(*extra: str):
    cfg = compose(
        *TINY,
        "head=cdl",
        "backbone.pretrained=null",
        "backbone.batch_norm=inference",
        "train.backbone_lr=null",  # one rate for every parameter
        *extra,
    )
    model = build_pretrained_model(cfg, 0, CxrStudy())
    steps = make_steps(model, cfg)

    def fresh():  # the train step donates its state
        return jax.tree.map(jnp.copy, init_state(model, cfg, steps.tx))

    return cfg, steps, fresh


@pytest.fixture(scope="module")
def plain_sgd():
    return _steps("data.augment=false", "train.optimizer=sgd", "train.lr=0.05")


def _train(steps, state, n: int, key=None):
    images, labels, mask = _batch()
    losses = []
    for i in range(n):
        state, loss = steps.train_step(
            state, images, labels, mask, key if key is not None else jax.random.key(i)
        )
        losses.append(float(loss))
    return state, losses


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizers_train(optimizer, plain_sgd):
    if optimizer == "sgd":
        _, steps, fresh = plain_sgd
    else:
        _, steps, fresh = _steps(
            "data.augment=false", "train.optimizer=adamw", "train.lr=3e-3", "train.weight_decay=0.1"
        )
    state, losses = _train(steps, fresh(), 15)
    assert losses[-1] < 0.85 * losses[0], losses
    assert int(state.step) == 15


def test_adamw_decays_weights_decoupled_from_the_gradient():
    """One step of adamw(wd) minus one of adam (the same moments) is exactly -lr * wd * w."""
    lr, wd = 1e-3, 0.5
    _, adam, fresh_a = _steps("data.augment=false", "train.optimizer=adam", f"train.lr={lr}")
    _, adamw, fresh_w = _steps(
        "data.augment=false", "train.optimizer=adamw", f"train.lr={lr}", f"train.weight_decay={wd}"
    )
    w0 = _leaves(fresh_a().params)
    a, _ = _train(adam, fresh_a(), 1)
    w, _ = _train(adamw, fresh_w(), 1)
    for p0, pa, pw in zip(w0, _leaves(a.params), _leaves(w.params), strict=True):
        np.testing.assert_allclose(pw - pa, -lr * wd * p0, rtol=1e-3, atol=1e-8)


def test_sgd_is_momentum_sgd(plain_sgd):
    """train.optimizer=sgd is SGD with momentum 0.9: a repeated gradient g moves the weights
    by -lr*g, then by -1.9*lr*g."""
    cfg, steps, fresh = plain_sgd
    state = fresh()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    first, opt = steps.tx.update(grads, state.opt_state, state.params)
    second, _ = steps.tx.update(grads, opt, state.params)
    for u1, u2 in zip(_leaves(first), _leaves(second), strict=True):
        np.testing.assert_allclose(u1, -cfg.train.lr * 0.5, rtol=1e-6)
        np.testing.assert_allclose(u2, -1.9 * cfg.train.lr * 0.5, rtol=1e-6)


def test_evaluation_loss_is_the_training_loss_definition(plain_sgd):
    """Inference-mode BN and no augmentation make the two forward passes the same function:
    the eval step's masked loss equals the train step's (before its update) on one batch,
    padding rows left out of both, and predict() averages it per real example."""
    _, steps, fresh = plain_sgd
    images, labels, mask = _batch(seed=3)
    state = fresh()
    probs, loss_sum = steps.eval_step(state, images, labels, mask)
    _, train_loss = steps.train_step(fresh(), images, labels, mask, jax.random.key(0))
    assert float(loss_sum) / REAL == pytest.approx(float(train_loss), rel=1e-6)
    _, split_loss = predict(steps.eval_step, state, images[:REAL], labels[:REAL], BATCH)
    assert split_loss == pytest.approx(float(train_loss), rel=1e-6)
    assert np.all((np.asarray(probs) > 0) & (np.asarray(probs) < 1))


def test_device_augmentation_in_the_jitted_step_equals_host_augmentation(plain_sgd):
    """data.augment_on=device (dm-pix inside the jitted step) against host (OpenCV in the
    loader) with the same key. On images that are zero near the edge the two differ only by
    the host's rounding to uint8, at most half a grey level (qtl.data.augment,
    tests/test_augment_host.py); through the step that must move the loss and the
    SGD-updated weights less than one grey level of noise does, and far less than another
    augmentation draw or none."""
    from qtl.data.augment import augment, augment_host

    common = ("train.optimizer=sgd", "train.lr=0.05", "data.hflip_p=0.5")
    cfg, device, fresh_d = _steps("data.augment_on=device", *common)
    _, host, fresh_h = _steps("data.augment_on=host", *common)
    _, plain, fresh_p = plain_sgd
    images, labels, mask = _batch(seed=4, border=3)
    key = jax.random.key(7)
    kw = {"hflip_p": cfg.data.hflip_p, "max_rotation_deg": cfg.data.max_rotation_deg}
    host_images = augment_host(images, key, **kw)
    pixels = np.abs(np.asarray(augment(images.astype(np.float32), key, **kw)) - host_images)
    assert pixels.max() <= 0.51  # the documented tolerance, everywhere on these images
    assert np.abs(host_images.astype(int) - images).max() > 100  # it really augments
    inside = host_images > 0
    step = np.random.default_rng(5).choice([-1, 1], size=host_images.shape) * inside
    noisy = np.clip(host_images.astype(int) + step, 0, 255).astype(np.uint8)  # +-1 grey level
    other = augment_host(images, jax.random.key(8), **kw)

    def run(steps, fresh, x):
        state, loss = steps.train_step(fresh(), x, labels, mask, key)
        return state.params, float(loss)

    d, d_loss = run(device, fresh_d, images)  # augmented inside the step
    h, h_loss = run(host, fresh_h, host_images)
    n, n_loss = run(host, fresh_h, noisy)
    o, o_loss = run(host, fresh_h, other)
    p, p_loss = run(plain, fresh_p, images)

    def dist(a, b):  # L2 distance between two weight sets updated from the same start
        return float(
            np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(_leaves(a), _leaves(b), strict=True)))
        )

    assert abs(d_loss - h_loss) <= abs(n_loss - h_loss)
    assert dist(d, h) <= dist(n, h)
    for ref, ref_loss in ((o, o_loss), (p, p_loss)):
        assert abs(d_loss - h_loss) < 0.05 * abs(d_loss - ref_loss)
        assert dist(d, h) < 0.3 * dist(d, ref)


# --- a resume across a code update -------------------------------------------------------------


class _Crash(BaseException):
    """Stands in for a kill after epoch 1's checkpoints are on disk."""


def test_resume_after_the_config_gained_a_field(synth_root, tmp_path, monkeypatch, capsys):
    """Epoch 1 is trained by "an older qtl" whose record lacks train.min_delta; the current
    qtl resumes it (the field's default keeps the old behaviour) and its history equals an
    uninterrupted run's. The pretrained=synthetic weights it started from are recorded."""
    from qtl.models.hf_import import sha256_file

    args = ("head=cdl", "train.max_epochs=2", "train.patience=5")
    straight = train_and_evaluate(_tiny(synth_root, *args), tmp_path / "straight")

    run_dir = tmp_path / "run"
    real_save = Checkpoints.save
    saves: list[str] = []

    def save_then_crash(self, which, *args, **kwargs):
        if "last" in saves:  # epoch 1 is on disk; die before epoch 2 saves anything
            raise _Crash
        real_save(self, which, *args, **kwargs)
        saves.append(which)

    monkeypatch.setattr(Checkpoints, "save", save_then_crash)
    with pytest.raises(_Crash):
        train_and_evaluate(_tiny(synth_root, *args), run_dir)
    monkeypatch.setattr(Checkpoints, "save", real_save)
    assert not (run_dir / "results.json").exists()

    record_path = run_dir / "run_config.json"
    record = json.loads(record_path.read_text())
    del record["identity"]["train.min_delta"]  # written before the field existed
    del record["config"]["train"]["min_delta"]
    record_path.write_text(json.dumps(record))

    capsys.readouterr()
    resumed = train_and_evaluate(_tiny(synth_root, *args), run_dir)
    assert "resuming" in capsys.readouterr().out
    rows, ref = _metrics(run_dir), _metrics(tmp_path / "straight")
    assert [r["epoch"] for r in rows] == [1, 2]
    for a, b in zip(rows, ref, strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert resumed["auroc"]["test"]["mean"] == pytest.approx(
        straight["auroc"]["test"]["mean"], rel=1e-5
    )
    upgraded = json.loads(record_path.read_text())
    assert upgraded["identity"]["train.min_delta"] == 0.0
    assert len(upgraded["upgrades"]) == 1

    weights = resumed["provenance"]["weights"]
    assert weights["source"] == weights["kind"] == "synthetic"
    file = Path(weights["path"]) / "model.safetensors"
    assert weights["sha256"] == sha256_file(file) and len(weights["sha256"]) == 64
    assert (
        resumed["provenance"]["runtime"]["first_session"]["augment"]
        == (resumed["config"]["data"]["augment_on"])
    )
    assert resumed["fingerprint"] == upgraded["fingerprint"] == straight["fingerprint"]
