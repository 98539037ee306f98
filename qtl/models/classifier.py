"""Backbone + head = the model a run trains; and the per-component parameter table."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from qtl.config import ConfigError, HeadName, QtlConfig
from qtl.models.heads import make_head
from qtl.models.resnet import ResNet


class Classifier(nnx.Module):
    """Images (B, H, W, 3) normalised -> logits (B, n_labels)."""

    def __init__(self, cfg: QtlConfig, *, rngs: nnx.Rngs):
        self.backbone = ResNet(cfg.backbone, rngs=rngs)
        self.head = make_head(cfg.head, self.backbone.num_features, len(cfg.task.labels), rngs=rngs)
        self.freeze_backbone = cfg.backbone.freeze

    def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``mask`` (B,): 1 on real rows, 0 on padding (kept out of batch-norm statistics)."""
        features = self.backbone(images, mask)
        if self.freeze_backbone:
            features = jax.lax.stop_gradient(features)
        return self.head(features)


SYNTHETIC = "synthetic"  # backbone.pretrained=synthetic: weights qtl trains (qtl.studies.pretrain)


def _source(cfg: QtlConfig, weights: str | None) -> str | None:
    """The weights to load: ``weights`` (resolved by the application) or the configured ones."""
    if weights is not None:
        return weights
    if cfg.backbone.pretrained == SYNTHETIC:
        raise ConfigError(
            "backbone.pretrained=synthetic names weights that qtl trains itself; build the "
            "model through qtl.studies.pretrain.build_pretrained_model (or pass weights=<folder>)."
        )
    return cfg.backbone.pretrained or None


def build_model(cfg: QtlConfig, seed: int, *, weights: str | None = None) -> Classifier:
    """Initialise from ``seed``, then load the backbone's starting weights: ``weights`` (a hub
    id or a folder, resolved by the application) or ``backbone.pretrained``."""
    model = Classifier(cfg, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1)))
    source = _source(cfg, weights)
    if source:
        from qtl.models.hf_import import load_pretrained

        load_pretrained(model.backbone, source)
    return model


def weights_provenance(cfg: QtlConfig, weights: str | None = None) -> dict[str, Any]:
    """Where the backbone's starting weights come from, resolved here and now: the file's
    sha256 and, for a hub id, the commit of the snapshot it names now."""
    source = _source(cfg, weights)
    if not source:
        return {"source": None, "kind": "random_init", "seed": cfg.seed}
    from qtl.models.hf_import import weights_provenance as resolve

    if cfg.backbone.pretrained == SYNTHETIC:
        return {**resolve(source), "source": SYNTHETIC, "kind": SYNTHETIC}
    return resolve(source)


def trainable_filter(cfg: QtlConfig) -> nnx.filterlib.Filter:
    """Which variables the optimiser updates: all Params, or only the head's when frozen."""
    if cfg.backbone.freeze:
        return nnx.All(nnx.Param, nnx.PathContains("head"))
    return nnx.Param


def _count(state: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


def parameter_table(model: Classifier, cfg: QtlConfig) -> list[tuple[str, int]]:
    """Parameter count per component, named as in the study's Table I."""
    backbone = _count(nnx.state(model.backbone, nnx.Param))
    rows = [("backbone", backbone)]
    if cfg.head.name == HeadName.dqc:
        head = model.head
        rows += [
            ("classical pre-process (w_in)", _count(nnx.state(head.pre, nnx.Param))),
            ("quantum weights (theta)", _count(nnx.state(head, nnx.Param)["theta"])),
            ("classical post-process (w_out)", _count(nnx.state(head.post, nnx.Param))),
        ]
    else:
        rows.append(("classical head (CDL)", _count(nnx.state(model.head, nnx.Param))))
    rows.append(("total", sum(n for _, n in rows)))
    return rows


def abstract_model(cfg: QtlConfig) -> Classifier:
    """The model's structure and shapes without allocating weights (fast, any size)."""
    return nnx.eval_shape(lambda: Classifier(cfg, rngs=nnx.Rngs(0)))
