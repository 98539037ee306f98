"""The yardstick of the cross-framework tests: the JAX model, its weights and what it computes.

One JAX model per (backbone, head), built once per session (``functools.cache``: building and
compiling is the slow part), with random non-trivial batch norm statistics and biases so that a
wrong BN formula, a missed running statistic or a transposed kernel would show. Each framework's
test hands these weights to its own model and compares logits, loss and every gradient.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jax.numpy as jnp
import numpy as np
from conftest import compose
from flax import nnx

from qtl.backends.weights import export_jax, jax_reference
from qtl.models.classifier import build_model

LABELS4 = "task.labels=[Atelectasis,Cardiomegaly,Effusion,Infiltration]"
COMMON = (
    "experiment=demo",
    "backbone.pretrained=null",
    "backbone.batch_norm=inference",
    "train.backbone_lr=null",
)
BACKBONES = {
    # bottleneck v1.5 blocks with a strided shortcut, 4 qubits: seconds per framework
    "small": (
        "backbone.layer_type=bottleneck",
        "backbone.embedding_size=8",
        "backbone.hidden_sizes=[16,32]",
        "backbone.depths=[1,2]",
        "task.name=tiny4",
        LABELS4,
        "data.resize=32",
        "data.crop=32",
    ),
    # the study's ResNet-50 at a small input (the architecture, not the resolution, is checked)
    "resnet50": ("backbone=resnet50", "task=cxr8", "data.resize=64", "data.crop=64"),
}
BATCH = {"small": 4, "resnet50": 2}


def config(backbone: str, head: str) -> Any:
    return compose(*COMMON, *BACKBONES[backbone], f"head={head}")


def _perturb(model: Any, seed: int) -> None:
    """Non-trivial BN (scale, shift, running mean/var) and biases, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    for path, var in nnx.to_flat_state(state):
        name, shape = str(path[-1]), tuple(var.shape)
        low_high = {"mean": (0.0, 0.3), "var": (0.5, 2.0), "scale": (0.5, 1.5), "bias": (0.0, 0.2)}
        if name not in low_high:
            continue
        a, b = low_high[name]
        value = rng.uniform(a, b, shape) if name in ("var", "scale") else rng.normal(a, b, shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)


@cache
def loss_after_adam(backbone: str, head: str) -> float:
    """The loss after one optax Adam step from the reference weights (what a second step sees)."""
    import jax
    import optax

    from qtl.data.preprocess import normalize
    from qtl.train.step import masked_bce

    ref = reference(backbone, head)
    graph, params, rest = nnx.split(ref["model"], nnx.Param, ...)
    x, y = normalize(jnp.asarray(ref["images"])), jnp.asarray(ref["labels"])
    mask = jnp.ones(y.shape[0], jnp.float32)

    @jax.jit
    def loss_fn(p: Any) -> jax.Array:
        return masked_bce(nnx.merge(graph, p, rest, copy=True)(x), y, mask)

    tx = optax.adam(ref["cfg"].train.lr)
    updates, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params)
    return float(loss_fn(optax.apply_updates(params, updates)))


@cache
def reference(backbone: str, head: str) -> dict[str, Any]:
    """Config, canonical weights, a uint8 batch, and the JAX logits / loss / gradients."""
    cfg = config(backbone, head)
    model = build_model(cfg, cfg.seed)
    _perturb(model, seed=1)
    rng = np.random.default_rng(2)
    px, n = cfg.data.crop, len(cfg.task.labels)
    images = rng.integers(0, 256, (BATCH[backbone], px, px), dtype=np.uint8)
    labels = (rng.uniform(size=(BATCH[backbone], n)) < 0.4).astype(np.float32)
    logits, loss, grads = jax_reference(model, images, labels)
    return {
        "model": model,
        "cfg": cfg,
        "weights": export_jax(model),
        "images": images,
        "labels": labels,
        "logits": logits,
        "loss": loss,
        "grads": grads,
    }


def assert_matches(ref: dict[str, Any], logits: np.ndarray, loss: float, grads: dict, tol: float):
    """Logits, loss and every gradient within ``tol`` of the JAX values, relative to the
    largest magnitude of each tensor (so a tensor of tiny gradients is held to its own scale)."""
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    assert logits.shape == ref["logits"].shape
    assert float(np.abs(logits - ref["logits"]).max()) <= tol * scale
    assert abs(loss - ref["loss"]) <= tol * max(1.0, abs(ref["loss"]))
    assert set(grads) == set(ref["grads"])  # every trainable weight, nothing else
    worst = {}
    for name, g_ref in ref["grads"].items():
        g = grads[name]
        assert g.shape == g_ref.shape, name
        top = float(np.abs(g_ref).max())
        assert top > 0, f"{name}: zero JAX gradient proves nothing"
        worst[name] = float(np.abs(g - g_ref).max()) / top
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, f"gradients off by more than {tol:g} (relative): {bad}"
    head = [k for k in ref["grads"] if k.startswith("head.")]
    assert head and len(ref["grads"]) > len(head)  # heads and backbone were both compared
