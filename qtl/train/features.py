"""Training a head on cached frozen-backbone features (``features.cache=true``).

The same run as on images - loop, checkpoints, resume, early stopping, records - with two
substitutions, kept here so the image path stays as it is:

* the data: per split the pooled backbone features (``qtl.data.features``) instead of the
  images; the loader draws the same batches (a function of seed and epoch alone);
* the model: the head alone. The backbone was frozen, so its output for an image is fixed;
  the head starts from the same seed-drawn weights as in the image run and sees the same
  features, so its predictions equal the image run's to float32 rounding (tested).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qtl.config import QtlConfig, validate_features
from qtl.data.cache import CachedData, Prep, _keep, cached_splits, index_key
from qtl.data.features import FORMAT, FeatureSet, features_for, key_of, prep_tag
from qtl.data.preprocess import normalize
from qtl.data.records import Split
from qtl.train.objectives import Objective
from qtl.train.step import Steps, TrainState, make_optimizer, masked_bce, nan_unless_finite


def backbone_digest(backbone: nnx.Module) -> str:
    """sha256 of every array the backbone holds (weights and batch-norm statistics), with
    their paths, dtypes and shapes: what was loaded, whatever it was called."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(backbone))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def make_embed(backbone: nnx.Module) -> Any:
    """``embed(uint8 (B, H, W)) -> float32 (B, width)``: the eval-mode backbone, jitted."""
    backbone.eval()
    graph, state = nnx.split(backbone)

    @jax.jit
    def run(state: nnx.State, images_u8: jax.Array) -> jax.Array:
        return nnx.merge(graph, state)(normalize(images_u8))

    return lambda images_u8: np.asarray(run(state, images_u8), np.float32)


def split_parts(cfg: QtlConfig, digest: str, split: Split) -> dict[str, Any]:
    """The key parts of one split's features (JSON-normal, as stored in its manifest)."""
    prep = Prep.of(cfg.data)
    parts = {
        "format": FORMAT,
        "backbone": digest,
        "prep": prep_tag(prep),
        "split": index_key(prep, split),
        "dtype": str(cfg.features.dtype),
    }
    return json.loads(json.dumps(parts))


def feature_sets(
    cfg: QtlConfig, backbone: nnx.Module, splits: dict[str, Split], *, progress: bool = False
) -> dict[str, FeatureSet]:
    """Every split's features: read from the cache, computing (and storing) what is missing."""
    from qtl.utils import paths

    validate_features(cfg, needed=True)
    root = paths.feature_cache(cfg.paths)
    digest = backbone_digest(backbone)
    embed = make_embed(backbone)
    out: dict[str, FeatureSet] = {}
    for name, split in splits.items():
        parts = split_parts(cfg, digest, split)

        def images_for(name: str = name, split: Split = split) -> tuple[Any, dict[int, str]]:
            data = cached_splits(cfg.data, {name: split}, progress=progress)
            reasons = {b.path: b.reason for b in data.skipped[name]}  # data.on_bad_image=skip
            bad = {i: reasons[str(p)] for i, p in enumerate(split.paths) if str(p) in reasons}
            return data.images[name], bad

        out[name] = features_for(
            root / key_of(parts),
            parts,
            images_for=images_for,
            embed=embed,
            width=backbone.num_features,
            chunk=cfg.features.chunk,
            batch_size=cfg.features.batch_size,
            level=cfg.features.level,
            progress=progress,
            desc=f"features {name}",
        )
    return out


def cached_features(
    cfg: QtlConfig, backbone: nnx.Module, splits: dict[str, Split], *, progress: bool = False
) -> CachedData:
    """What the driver trains on, as :func:`qtl.data.cache.cached_splits` gives it for
    images: per split the features (in place of images), the kept records, the skipped."""
    from qtl.data.cache import BadImage

    sets = feature_sets(cfg, backbone, splits, progress=progress)
    data = CachedData({}, {}, {})
    for name, fs in sets.items():
        split = splits[name]
        data.images[name] = fs.features  # type: ignore[assignment]
        data.splits[name] = _keep(split, fs.bad) if fs.bad else split
        data.skipped[name] = [
            BadImage(split.ids[i], str(split.paths[i]), r) for i, r in sorted(fs.bad.items())
        ]
        data.built += fs.computed
        data.cached += fs.cached
    computed = sum(fs.computed for fs in sets.values())
    total = sum(len(fs.features) for fs in sets.values())
    where = Path(next(iter(sets.values())).directory).parent if sets else "-"
    print(f"[qtl] features {where}: {total} vectors, {computed} computed now.")
    return data


def _split_head(head: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(head, nnx.Param, ...)


def init_feature_state(head: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
    """The head's train state: its parameters (all trainable) and the rest (none today)."""
    _, params, rest = _split_head(head)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
    )


def make_feature_steps(head: nnx.Module, cfg: QtlConfig) -> Steps:
    """The train and eval steps of :func:`qtl.train.step.make_steps`, on features.

    Same signatures (the augmentation key is accepted and unused: augmentation is off with
    cached features, see ``validate_features``), so the loop and predict run unchanged.
    """
    tx = make_optimizer(cfg.train)
    objective = Objective()  # the CXR study's: features are cached for its backbone only
    head.train()
    train_graph, _, _ = _split_head(head)
    head.eval()
    eval_graph, _, _ = _split_head(head)

    def loss_fn(params, rest, features, labels, mask):
        module = nnx.merge(train_graph, params, rest, copy=True)
        loss = masked_bce(module(features), labels, mask)
        return loss, _split_head(module)[2]  # the rest: a noisy circuit's key stream advances

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, features, labels, mask, key) -> tuple[TrainState, jax.Array]:
        del key
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.rest, features.astype(jnp.float32), labels, mask
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, rest, opt_state)
        return new_state, nan_unless_finite(loss, grads, new_state)

    @jax.jit
    def eval_step(state: TrainState, features, labels, mask) -> tuple[jax.Array, jax.Array]:
        module = nnx.merge(eval_graph, state.params, state.rest, copy=True)
        return objective.eval_outputs(module(features.astype(jnp.float32)), labels, mask)

    return Steps(eval_graph, train_step, eval_step, tx, objective)
