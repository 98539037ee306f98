"""Vision transformer with optional quantum projections (Flax NNX): ``model=vit | qvit``.

Layout of the closest public QViT (Comajoan Cara et al.'s QuantumTransformers): patch
embedding by a conv with kernel =
stride = patch, learned positional embedding, pre-LayerNorm blocks (x + Attn(LN(x)), then
x + MLP(LN(x))), a final LayerNorm, global-average pooling and a linear classifier. In the QViT
the Q, K, V and attention-output projections are d-qubit quantum layers (d = hidden size,
output width = input width, no bias), and optionally the MLP's middle layer:
Linear(d -> m) -> quantum layer (m qubits) -> dropout -> GELU -> Linear(m -> d).
All quantum layers of a model share one circuit config and simulator; each has its own weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qtl.models.vit_config import ViTConfig, validate_vit
from qtl.quantum.layer import QuantumLayer


def _projection(name: str, d_in: int, d_out: int, cfg: ViTConfig, rngs: nnx.Rngs) -> nnx.Module:
    if name in cfg.quantum:
        if d_in != d_out:
            raise ValueError(f"quantum projection '{name}' must keep its width ({d_in}->{d_out})")
        return QuantumLayer(d_in, cfg.circuit, rngs=rngs)
    return nnx.Linear(d_in, d_out, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention; each projection a Linear or a quantum layer."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q = _projection("q", d, d, cfg, rngs)
        self.k = _projection("k", d, d, cfg, rngs)
        self.v = _projection("v", d, d, cfg, rngs)
        self.o = _projection("o", d, d, cfg, rngs)
        self.attn_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.heads

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, self.heads, hd)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        weights = self.attn_dropout(jax.nn.softmax(scores, axis=-1))
        out = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
        return self.o(out)


class MLP(nnx.Module):
    """Linear(d -> m) -> [quantum layer] -> dropout -> GELU -> Linear(m -> d)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.mlp_size, rngs=rngs)
        self.quantum = (
            QuantumLayer(cfg.mlp_size, cfg.circuit, rngs=rngs) if "mlp" in cfg.quantum else None
        )
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.fc1(x)
        if self.quantum is not None:
            x = self.quantum(x)
        return self.fc2(jax.nn.gelu(self.dropout(x)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.drop1 = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.drop2 = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.drop2(self.mlp(self.norm2(x)))


def num_tokens(image_shape: tuple[int, int, int], patch: int) -> int:
    """Patches of a VALID conv with kernel = stride = patch (a remainder is dropped)."""
    h, w, _ = image_shape
    if h < patch or w < patch:
        raise ValueError(f"model.patch_size={patch} is larger than the {h}x{w} image")
    return (h // patch) * (w // patch)


class ViT(nnx.Module):
    """Images (B, H, W, C) normalised -> logits (B, n_outputs)."""

    def __init__(
        self,
        cfg: ViTConfig,
        image_shape: tuple[int, int, int],
        n_outputs: int,
        *,
        rngs: nnx.Rngs,
    ):
        validate_vit(cfg)
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.patch = nnx.Conv(image_shape[2], d, (p, p), strides=(p, p), padding="VALID", rngs=rngs)
        tokens = num_tokens(image_shape, p) + (1 if cfg.pool == "token" else 0)
        std = 1.0 / math.sqrt(d)
        self.cls = nnx.Param(jnp.zeros((1, 1, d), jnp.float32)) if cfg.pool == "token" else None
        self.pos = nnx.Param(std * jax.random.normal(rngs.params(), (1, tokens, d), jnp.float32))
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, n_outputs, rngs=rngs)

    def __call__(self, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``mask`` (B,) is accepted for the trainer's interface; a ViT has no batch statistics
        for padding rows to disturb."""
        x = self.patch(images)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        if self.cls is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])), x], 1)
        x = self.drop(x + self.pos[...])
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cls is not None else x.mean(axis=1)
        return self.head(pooled)


def build_vit(cfg: ViTConfig, image_shape: tuple[int, int, int], n_outputs: int, seed: int) -> ViT:
    """The model a run trains: ``match_params_of`` resolved for this dataset, seeded init."""
    from qtl.models.vit_costs import resolve

    resolved = resolve(cfg, image_shape, n_outputs)
    key = jax.random.key(seed)
    rngs = nnx.Rngs(params=jax.random.fold_in(key, 1), dropout=jax.random.fold_in(key, 2))
    return ViT(resolved, image_shape, n_outputs, rngs=rngs)
