"""ResNet-18-style CNN for MedMNIST (``model=resnet18``): the MedMNIST v2 baseline and the
default knowledge-distillation teacher.

MedMNIST v2 trains torchvision's ResNet-18 at 28 px with the stem replaced by a 3x3 stride-1
conv and no max pool (a 7x7 stride-2 stem and a pool would leave 7 px for four stages). The
residual stages are qtl's own (:mod:`qtl.models.resnet`, batch statistics in training, padding
rows kept out of them); the head is a linear layer on the global mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qtl.config import LayerType, ModelConfig
from qtl.models.resnet import ConvLayer, Encoder


class MedCNN(nnx.Module):
    """Images (B, H, W, C) normalised -> logits (B, n_outputs)."""

    def __init__(self, cfg: ModelConfig, channels: int, n_outputs: int, *, rngs: nnx.Rngs):
        widths = tuple(int(w) for w in cfg.cnn_widths)
        self.stem = ConvLayer(
            channels, int(cfg.cnn_stem), 3, 1, bn_frozen=False, as_matmul=False, rngs=rngs
        )
        self.encoder = Encoder(
            LayerType.basic,
            int(cfg.cnn_stem),
            widths,
            tuple(int(d) for d in cfg.cnn_depths),
            bn_frozen=False,
            as_matmul=True,
            rngs=rngs,
        )
        self.head = nnx.Linear(widths[-1], n_outputs, rngs=rngs)

    def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.encoder(self.stem(images.astype(jnp.float32), mask), mask)
        return self.head(jnp.mean(x, axis=(1, 2)))


def cnn_parameter_table(model: MedCNN) -> list[tuple[str, int]]:
    """Parameters per component of the CNN (batch statistics are not parameters)."""

    def count(module: nnx.Module) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    rows = [
        ("stem (3x3 conv + BN)", count(model.stem)),
        ("residual stages", count(model.encoder)),
        ("classifier", count(model.head)),
    ]
    return [*rows, ("total", sum(n for _, n in rows))]
