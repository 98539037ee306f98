"""backend=tf: the JAX model's weights in Keras 3 give the same logits, loss and gradients.

qtl's Keras ResNet v1.5 (torch-style padding, BN eps 1e-5, OIHW -> HWIO kernels) + the heads,
with the circuit simulated gate by gate in TF (complex64), on the same uint8 batch as the JAX
step. Tolerance 1e-4 (1e-3 for ResNet-50) relative to each tensor's largest value: float32
sums in another order (TF's kernels vs XLA's); the circuit in complex64 against JAX's real
float32 ``fast`` simulator differs by ~1e-7 at 4 qubits.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from backend_reference import assert_matches, loss_after_adam, reference  # noqa: E402
from conftest import compose  # noqa: E402

from qtl.backends import check_installed, refuse_training  # noqa: E402
from qtl.backends import tf_model as tfm  # noqa: E402
from qtl.config import ConfigError  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("head", ["cdl", "dqc"])
def test_same_weights_same_logits_loss_and_gradients(head):
    ref = reference("small", head)
    model = tfm.build(ref["cfg"], ref["weights"])
    logits, loss, grads = tfm.loss_and_grads(model, ref["images"], ref["labels"])
    assert_matches(ref, logits, loss, grads, TOL)


def test_xla_train_step_is_bce_and_adam_as_in_jax():
    """The tf.function(jit_compile=True) step with the dressed head: first loss = JAX's,
    second = JAX's after one optax Adam update (Keras folds eps into the bias-corrected rate:
    the same update to ~1e-8). One head: each XLA compilation costs tens of seconds here."""
    head = "dqc"
    ref = reference("small", head)
    model = tfm.build(ref["cfg"], ref["weights"])
    step = tfm.make_step(model, ref["cfg"], jit_compile=True)
    x, y = tf.constant(ref["images"]), tf.constant(ref["labels"])
    first, second = step(x, y), step(x, y)
    assert first == pytest.approx(ref["loss"], abs=TOL)
    assert second == pytest.approx(loss_after_adam("small", head), abs=TOL)
    assert abs(second - first) > 10 * TOL


def test_circuit_matches_pennylane_for_every_variant():
    """The TF state vector runs qtl's tape: equal to PennyLane default.qubit (float64) for
    every entangler and rotation, on 3 and 4 qubits, depth 2."""
    import jax

    from qtl.quantum.circuit import CircuitSpec, pennylane_circuit

    rng = np.random.default_rng(0)
    for n in (3, 4):
        for entangler in ("ring", "chain", "even_odd"):
            for rotation in ("ry", "rx", "rz_ry"):
                spec = CircuitSpec(n, 2, entangler, rotation)
                x = rng.uniform(-1.5, 1.5, (5, n)).astype(np.float32)
                theta = rng.normal(0, 2, spec.theta_shape).astype(np.float32)
                with jax.enable_x64(True):
                    want = np.asarray(
                        pennylane_circuit(spec)(x.astype(np.float64), theta.astype(np.float64))
                    )
                got = tfm.tf_circuit(spec)(tf.constant(x), tf.constant(theta)).numpy()
                np.testing.assert_allclose(got, want, atol=2e-6, err_msg=str(spec))


def test_keras_resnet50_is_v1_5_with_hf_parameter_count():
    cfg = compose("backbone=resnet50", "backbone.batch_norm=inference", "head=cdl", "task=cxr8")
    model = tfm.build(cfg)
    model(tf.zeros((1, 32, 32), tf.uint8))
    backbone = sum(int(np.prod(v.shape)) for v in model.backbone.trainable_variables)
    assert backbone == 23_508_032
    # v1.5: the stride of a downsampling block sits in its 3x3 conv, not the first 1x1
    block = model.backbone.blocks[3]  # stage 1, layer 0
    assert [c.conv.stride for c in block.convs] == [1, 2, 1] and block.shortcut.conv.stride == 2


def test_training_with_tf_is_refused_and_a_missing_extra_is_named(monkeypatch):
    with pytest.raises(ConfigError, match=r"backend=tf cannot train: .*mode=bench_step"):
        refuse_training(compose("backend=tf"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name)
    )
    with pytest.raises(ConfigError, match=r"extra 'tf'.*pip install -e '\.\[tf\]'"):
        check_installed("tf")


@pytest.mark.slow
def test_resnet50_same_as_jax():
    """ResNet-50 with the dressed head. Tolerance 1e-3, for the reason given in
    tests/test_backend_torch.py (cancelling sums in late BN-bias gradients)."""
    ref = reference("resnet50", "dqc")
    model = tfm.build(ref["cfg"], ref["weights"])
    logits, loss, grads = tfm.loss_and_grads(model, ref["images"], ref["labels"])
    assert_matches(ref, logits, loss, grads, 1e-3)
