"""One jitted train step and one jitted eval step over an explicit state.

The model lives as (graphdef, trainable params, the rest); the rest holds BatchNorm
statistics, which the forward pass may update but the optimiser never sees (the study's code
passed them to the optimiser). Images arrive as uint8 grayscale; normalisation, augmentation
and the channel copy happen inside the step on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from qtl.config import ConfigError, QtlConfig, TrainConfig
from qtl.data.augment import augment, placement
from qtl.models.classifier import Classifier, trainable_filter
from qtl.train.objectives import Objective, masked_bce  # noqa: F401  (re-exported)


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree checkpointed as a whole."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any


def _transform(name: str, lr: float, weight_decay: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ConfigError(f"train.optimizer={name!r}: use adam, adamw or sgd")


def _is_backbone(path: tuple) -> bool:
    return bool(path) and getattr(path[0], "key", None) == "backbone"


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimiser; with ``backbone_lr`` the backbone gets its own (usually smaller) rate.

    A smaller backbone rate keeps pretrained features intact while a head learns: Adam
    rescales even tiny, noisy gradients (the DQC's, through the circuit) to full-size steps.
    """
    head = _transform(cfg.optimizer, cfg.lr, cfg.weight_decay)
    if cfg.backbone_lr is None or cfg.backbone_lr == cfg.lr:
        return head
    backbone = _transform(cfg.optimizer, cfg.backbone_lr, cfg.weight_decay)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "backbone" if _is_backbone(path) else "head", params
        )

    return optax.multi_transform({"backbone": backbone, "head": head}, labels)


def nan_unless_finite(loss: jax.Array, *trees: Any) -> jax.Array:
    """``loss``, or NaN when it or any float leaf of ``trees`` is not finite.

    A step returns this, so the loop's check of the losses it fetches anyway guards every
    save against a non-finite gradient or update (no extra device sync).
    """
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(trees):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite &= jnp.isfinite(leaf).all()
    return jnp.where(finite, loss, jnp.nan)


@dataclass(frozen=True)
class Steps:
    """The compiled functions of one run plus what they close over."""

    eval_graph: nnx.GraphDef
    train_step: Callable[..., tuple[TrainState, jax.Array]]
    eval_step: Callable[..., tuple[jax.Array, jax.Array]]
    tx: optax.GradientTransformation
    objective: Objective = Objective()  # the loss and the split scores (CXR by default)


def split_model(model: Classifier, cfg: QtlConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(model, trainable_filter(cfg), ...)


def init_state(model: Classifier, cfg: QtlConfig, tx: optax.GradientTransformation) -> TrainState:
    _, params, rest = split_model(model, cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
    )


def make_steps(model: Any, cfg: QtlConfig, objective: Objective | None = None) -> Steps:
    """Compile-ready train/eval steps for ``model`` (its weights are not captured).

    ``objective``: the loss and scores (:class:`Objective`); None = the CXR study's BCE.
    """
    objective = objective or Objective()
    tx = make_optimizer(cfg.train)
    model.train()
    train_graph, _, _ = split_model(model, cfg)
    model.eval()
    eval_graph, _, _ = split_model(model, cfg)
    data = cfg.data
    do_augment = placement(data) == "device"  # "host": the loader threads augment

    def prepare(images_u8: jax.Array, key: jax.Array | None) -> jax.Array:
        images = images_u8.astype(jnp.float32)
        if key is not None:
            images = augment(
                images, key, hflip_p=data.hflip_p, max_rotation_deg=data.max_rotation_deg
            )
        return objective.normalize(images)

    def loss_fn(params, rest, images, labels, mask, step):
        module = nnx.merge(train_graph, params, rest, copy=True)  # fresh Variables at this trace
        logits = module(images, mask)  # the mask keeps padding out of batch-norm statistics
        _, _, new_rest = split_model(module, cfg)
        return objective.train_loss(logits, labels, mask, step), new_rest

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, images_u8, labels, mask, key) -> tuple[TrainState, jax.Array]:
        images = prepare(images_u8, key if do_augment else None)
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, images, labels, mask, state.step
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, rest, opt_state)
        return new_state, nan_unless_finite(loss, grads, new_state)

    @jax.jit
    def eval_step(state: TrainState, images_u8, labels, mask) -> tuple[jax.Array, jax.Array]:
        module = nnx.merge(eval_graph, state.params, state.rest, copy=True)
        return objective.eval_outputs(module(prepare(images_u8, None)), labels, mask)

    return Steps(eval_graph, train_step, eval_step, tx, objective)
