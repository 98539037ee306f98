"""Backbone + head = the model a run trains; and the per-component parameter table."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from qtl.config import HeadName, QtlConfig
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


def build_model(cfg: QtlConfig, seed: int) -> Classifier:
    """Initialise from ``seed`` (then load pretrained backbone weights when configured)."""
    model = Classifier(cfg, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1)))
    source = cfg.backbone.pretrained
    if source:
        from qtl.models.hf_import import load_pretrained
        from qtl.models.pretrain import SYNTHETIC, synthetic_pretrained

        if source == SYNTHETIC:
            source = str(synthetic_pretrained(cfg))
        load_pretrained(model.backbone, source)
    return model


def weights_provenance(cfg: QtlConfig) -> dict[str, Any]:
    """Where the backbone's starting weights come from for ``cfg``, resolved here and now.

    ``pretrained=synthetic`` resolves to its cached folder (pretraining it if it is not there
    yet, as :func:`build_model` would); a hub id to the snapshot of the commit it names now.
    """
    source = cfg.backbone.pretrained
    if not source:
        return {"source": None, "kind": "random_init", "seed": cfg.seed}
    from qtl.models.hf_import import weights_provenance as resolve
    from qtl.models.pretrain import SYNTHETIC, synthetic_pretrained

    if source == SYNTHETIC:
        return {**resolve(str(synthetic_pretrained(cfg))), "source": SYNTHETIC, "kind": SYNTHETIC}
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
