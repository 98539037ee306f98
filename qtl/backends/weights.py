"""One weight layout for every framework: PyTorch names and shapes.

The backbone's tensors are named as in transformers' ``ResNetModel`` (the ``microsoft/resnet-50``
checkpoint qtl imports), prefixed ``backbone.``; the heads' as the PyTorch model of
:mod:`qtl.backends.torch_model` names them: ``head.fc.*`` (CDL) or ``head.pre.*``,
``head.theta``, ``head.post.*`` (DQC). Linear weights are (out, in), conv kernels OIHW. The
JAX model exports to this layout, the PyTorch model *is* it, and the Keras model maps each
name to its own variable, so a weight or gradient is compared by name across frameworks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtl.config import ConfigError


def _torch_name(path: tuple[Any, ...]) -> tuple[str, str]:
    """Canonical name of one NNX variable path, and the NNX variable name."""
    from qtl.models.hf_import import _RENAME

    *module_path, name = (str(p) for p in path)
    if name == "theta":
        return ".".join([*module_path, "theta"]), name
    return ".".join([*module_path, _RENAME[name][0]]), name


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name == "kernel":
        # conv HWIO -> OIHW; Linear (in, out) -> (out, in)
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def state_to_torch_layout(state: Any) -> dict[str, np.ndarray]:
    """An NNX state (the model's variables, or gradients of its Params) by canonical name."""
    from flax import nnx

    out: dict[str, np.ndarray] = {}
    for path, leaf in nnx.to_flat_state(state):
        key, name = _torch_name(path)
        value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
        out[key] = _to_torch_layout(name, np.asarray(value))
    return out


def export_jax(model: Any) -> dict[str, np.ndarray]:
    """Every weight of a :class:`qtl.models.classifier.Classifier` (params and BN statistics)."""
    from flax import nnx

    return state_to_torch_layout(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def check_names(expected: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray]) -> None:
    """Strict load: every expected tensor present with its shape, nothing left over."""
    missing = sorted(expected.keys() - weights.keys())
    unused = sorted(weights.keys() - expected.keys())
    reshaped = [
        f"{k}: expected {expected[k]}, got {tuple(weights[k].shape)}"
        for k in sorted(expected.keys() & weights.keys())
        if tuple(weights[k].shape) != tuple(expected[k])
    ]
    if missing or unused or reshaped:
        raise ConfigError(
            "weights do not fit the model built from backbone.*/head.*/task: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unused)} unused "
            f"(e.g. {unused[:3]}), {len(reshaped)} with another shape (e.g. {reshaped[:3]})."
        )


def jax_reference(
    model: Any, images_u8: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """What the JAX train step computes before its update: logits, mean BCE, gradients by name.

    The same preprocessing (ImageNet normalisation, channel copy) and loss as
    :mod:`qtl.train.step`, without augmentation; the yardstick for the other frameworks.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qtl.data.preprocess import normalize
    from qtl.train.step import masked_bce

    graph, params, rest = nnx.split(model, nnx.Param, ...)
    x = normalize(jnp.asarray(images_u8))
    y = jnp.asarray(labels, jnp.float32)
    mask = jnp.ones(y.shape[0], jnp.float32)

    def loss_fn(p):
        logits = nnx.merge(graph, p, rest, copy=True)(x)
        return masked_bce(logits, y, mask), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return np.asarray(logits), float(loss), state_to_torch_layout(grads)
