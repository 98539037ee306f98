"""backend=torch: the JAX model's weights in PyTorch give the same logits, loss and gradients.

transformers' ``ResNetModel`` + qtl's heads (PennyLane default.qubit, torch interface,
backprop) on the same uint8 batch as the JAX step. Tolerance 1e-4 (1e-3 for ResNet-50),
relative to each tensor's largest value: float32 convolutions summed in another order (oneDNN
vs XLA) differ by ~1e-6 relative per layer, and PennyLane's torch route runs the circuit in
float64 where JAX's ``fast`` runs float32. Worst measured: ~2e-6 on the small backbone, ~4e-4
on ResNet-50 (see :func:`test_resnet50_same_as_jax`).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backend_reference import assert_matches, loss_after_adam, reference  # noqa: E402
from conftest import compose  # noqa: E402

from qtl.backends import check_installed, refuse_training, require  # noqa: E402
from qtl.backends import torch_model as tm  # noqa: E402
from qtl.config import ConfigError  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("head", ["cdl", "dqc"])
def test_same_weights_same_logits_loss_and_gradients(head):
    ref = reference("small", head)
    model = tm.build(ref["cfg"], ref["weights"])
    logits, loss, grads = tm.loss_and_grads(model, ref["images"], ref["labels"])
    assert_matches(ref, logits, loss, grads, TOL)


@pytest.mark.parametrize("head", ["cdl", "dqc"])
def test_train_step_is_bce_and_adam_as_in_jax(head):
    """Two steps on one batch: the first returns the JAX loss, the second the loss after one
    optax Adam update, so the optimiser (rate, eps, bias correction) matches too."""
    ref = reference("small", head)
    model = tm.build(ref["cfg"], ref["weights"])
    step = tm.make_step(model, ref["cfg"])
    x, y = torch.from_numpy(ref["images"]), torch.from_numpy(ref["labels"])
    first, second = float(step(x, y)), float(step(x, y))
    assert first == pytest.approx(ref["loss"], abs=TOL)
    assert second == pytest.approx(loss_after_adam("small", head), abs=TOL)
    assert abs(second - first) > 10 * TOL  # the update really moved the weights


def test_weights_that_do_not_fit_are_refused():
    ref = reference("small", "cdl")
    weights = dict(ref["weights"])
    weights.pop("head.fc.bias")
    weights["head.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ConfigError, match=r"1 missing.*head.fc.bias.*1 unused.*head.extra"):
        tm.build(ref["cfg"], weights)


def test_batch_statistics_mode_and_other_optimisers_are_refused():
    cfg = compose("backbone=resnet_small")
    with pytest.raises(ConfigError, match="backbone.batch_norm=batch"):
        tm.build(cfg)  # resnet_small trains its BN statistics; the PyTorch model does not
    cfg = compose("experiment=demo", "backbone.pretrained=null", "backbone.batch_norm=inference")
    with pytest.raises(ConfigError, match="train.backbone_lr=null"):
        tm.make_step(tm.build(cfg), cfg)


def test_training_with_torch_is_refused_with_what_it_is_for():
    with pytest.raises(ConfigError) as err:
        refuse_training(compose("backend=torch"))
    assert "mode=bench_step" in str(err.value) and "Training runs in JAX" in str(err.value)
    refuse_training(compose("backend=jax"))  # no error


def test_a_missing_extra_is_named(monkeypatch):
    import importlib
    import importlib.util

    real_find, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find(name)
    )

    def no_torch(name, *a):
        if name == "torch":
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_torch)
    for call in (check_installed, require):
        with pytest.raises(ConfigError, match=r"extra 'torch'.*pip install -e '\.\[torch\]'"):
            call("torch")
    check_installed("jax")


def test_torch_without_transformers_names_the_extra(monkeypatch):
    """transformers comes with the torch extra, not the core: its absence names that extra."""
    import importlib
    import importlib.util

    real_find, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real_find(name),
    )

    def no_transformers(name, *a):
        if name == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_transformers)
    for call in (check_installed, require):
        with pytest.raises(ConfigError, match=r"extra 'torch'.*transformers.*\.\[torch\]"):
            call("torch")


@pytest.mark.slow
def test_torch_compile_step_equals_eager():
    """torch.compile compiles the Linear layers (and the backbone in the benchmark); the
    PennyLane circuit is a graph break. Head only, to keep the compilation short."""
    ref = reference("small", "dqc")
    features = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    x, y = torch.from_numpy(features), torch.from_numpy(ref["labels"])
    losses = []
    for compiled in (False, True):
        model = tm.build(ref["cfg"], ref["weights"], head_only=True)
        step = tm.make_step(model, ref["cfg"], compile=compiled)
        losses.append([float(step(x, y)) for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-6)
    assert losses[0][1] < losses[0][0]


@pytest.mark.slow
def test_resnet50_same_as_jax():
    """ResNet-50 with the dressed head (its CDL head is the small test's Linear). Tolerance
    1e-3: the gradient of a late BN bias is a sum over batch x positions whose terms mostly
    cancel, so float32 summation order (oneDNN vs XLA) shows at up to ~4e-4 of its size."""
    ref = reference("resnet50", "dqc")
    model = tm.build(ref["cfg"], ref["weights"])
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032
    logits, loss, grads = tm.loss_and_grads(model, ref["images"], ref["labels"])
    assert_matches(ref, logits, loss, grads, 1e-3)
