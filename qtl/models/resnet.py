"""Flax NNX ResNet that mirrors transformers' PyTorch ``ResNetModel`` layer for layer.

transformers 5 has no Flax models, so the backbone is written here. The module tree and the
variable names follow the PyTorch model (``embedder.embedder.convolution``,
``encoder.stages.i.layers.j.layer.k``, ``...shortcut``), which makes the weight import in
:mod:`qtl.models.hf_import` a rename plus a kernel transpose, and lets a parity test prove
that the same weights give the same features.

Layout is NHWC, float32; conv kernels are HWIO. Conv padding is ``kernel_size // 2`` on both
sides, as in PyTorch (not XLA's ``SAME``, which pads asymmetrically for stride 2).

Train/eval: the model is built in eval mode. ``model.train()`` / ``model.eval()`` (or
``nnx.view(model, use_running_average=...)``) switch every batch norm. With
``BatchNormMode.inference`` (or ``freeze``) batch norm always uses, and never updates, its
running statistics, whatever the mode — the setting for fine-tuning a pretrained backbone.
With ``BatchNormMode.batch`` the train-mode call takes the batch's mask, so padding rows of a
last partial batch are left out of the batch statistics.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtl.config import BackboneConfig, BatchNormMode, ConfigError, LayerType

_BOTTLENECK_REDUCTION = 4
# PyTorch BatchNorm2d defaults, so a model trained from scratch behaves like the HF one.
_BN_MOMENTUM = 0.1
_BN_EPSILON = 1e-5


def _he_normal(key: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """HWIO kernel ~ N(0, 2 / fan_out), as transformers' ``kaiming_normal_(mode="fan_out")``.

    The draw is done by numpy, seeded from ``key``: ``jax.random`` compiles one XLA sampler
    per kernel shape (~0.5 s each on CPU), which made building even a tiny ResNet take ~10 s.
    Eager builds call numpy directly; traced ones (``nnx.jit``, ``nnx.eval_shape``) call the
    same function through ``pure_callback``, so both give the same weights for the same key.
    """
    std = np.float32(math.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))

    def draw(seed: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(np.asarray(seed, np.uint32).ravel())
        return rng.standard_normal(shape, dtype=np.float32) * std

    seed = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if isinstance(seed, jax.core.Tracer):
        out = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.pure_callback(draw, out, seed, vmap_method="sequential")
    return jnp.asarray(draw(np.asarray(seed)))


class BatchNorm(nnx.Module):
    """Batch norm over the channel (last) axis with PyTorch's update rule.

    Running statistics are ``nnx.BatchStat`` (never ``nnx.Param``), so an optimiser over
    parameters cannot touch them. ``frozen=True`` pins the layer to its running statistics
    even in training mode. In training mode with a ``mask`` (B,) the batch statistics, and so
    the running averages, come from the real rows only: the padding of a last partial batch
    (copies of example 0) never counts, and the real rows' outputs do not depend on it.
    """

    def __init__(self, num_features: int, *, frozen: bool) -> None:
        ones, zeros = np.ones(num_features, np.float32), np.zeros(num_features, np.float32)
        # from numpy: jnp.ones/zeros would compile one tiny XLA program per width
        self.scale = nnx.Param(jnp.asarray(ones))
        self.bias = nnx.Param(jnp.asarray(zeros))
        self.mean = nnx.BatchStat(jnp.asarray(zeros))
        self.var = nnx.BatchStat(jnp.asarray(ones))
        self.frozen = frozen
        self.use_running_average = True  # flipped by Module.train()/eval() and nnx.view

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Hook for ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if self.frozen or self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            # PyTorch's update rule; the running variance is the unbiased one
            mean, var, unbiased, observed = _batch_moments(x, mask)
            m = _BN_MOMENTUM * observed
            self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean)
            self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * unbiased)
        inv = self.scale[...] * jax.lax.rsqrt(var + _BN_EPSILON)
        return x * inv + (self.bias[...] - mean * inv)


def _batch_moments(x: jax.Array, mask: jax.Array | None) -> tuple[Any, Any, Any, Any]:
    """Per-channel mean, biased and unbiased variance over the real rows, and the share of the
    momentum the running averages take (0 when no row is real: nothing was observed).

    ``mask`` (B,) is 1 on real rows and 0 on padding. Padding rows are selected out with
    ``where`` rather than multiplied by 0, so even a non-finite padding value cannot leak into
    the statistics (or, through them, into the real rows' outputs and gradients).
    """
    axes = tuple(range(x.ndim - 1))
    if mask is None:
        n = x.size // x.shape[-1]
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)  # two-pass: no cancellation
        return mean, var, var * (n / max(n - 1, 1)), 1.0
    real = (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    n = jnp.sum(mask > 0).astype(jnp.float32) * math.prod(x.shape[1:-1])
    n_safe = jnp.maximum(n, 1.0)
    mean = jnp.sum(jnp.where(real, x, 0.0), axis=axes) / n_safe
    var = jnp.sum(jnp.where(real, jnp.square(x - mean), 0.0), axis=axes) / n_safe
    unbiased = var * (n_safe / jnp.maximum(n - 1.0, 1.0))
    return mean, var, unbiased, (n > 0).astype(x.dtype)


class Conv2d(nnx.Module):
    """Bias-free square conv with PyTorch's symmetric ``k // 2`` padding.

    With ``as_matmul`` a 1x1 conv runs as a matrix product (strided: subsample first). The
    result is the same, but XLA's CPU backend computes conv weight gradients very slowly and
    a matmul's quickly, which halves a CPU training step. The kernel is (1, 1, Cin, Cout)
    either way, so checkpoints do not depend on the flag.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(_he_normal(rngs.params(), shape))
        self.stride = stride
        self.padding = kernel_size // 2
        self.as_matmul = as_matmul and kernel_size == 1

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.as_matmul:
            s = self.stride
            if s > 1:
                x = x[:, ::s, ::s, :]
            b, h, w, c = x.shape
            y = jnp.dot(x.reshape(b * h * w, c), self.kernel[0, 0])
            return y.reshape(b, h, w, -1)
        p = self.padding
        return jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class ConvLayer(nnx.Module):
    """Conv → batch norm → optional ReLU (HF ``ResNetConvLayer``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        relu: bool = True,
        bn_frozen: bool,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        self.convolution = Conv2d(
            in_channels, out_channels, kernel_size, stride, as_matmul=as_matmul, rngs=rngs
        )
        self.normalization = BatchNorm(out_channels, frozen=bn_frozen)
        self.relu = relu

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.normalization(self.convolution(x), mask)
        return jax.nn.relu(x) if self.relu else x


class Embeddings(nnx.Module):
    """Stem: 7x7 stride-2 conv + BN + ReLU, then 3x3 stride-2 max pool with padding 1."""

    def __init__(self, out_channels: int, *, bn_frozen: bool, rngs: nnx.Rngs) -> None:
        self.embedder = ConvLayer(
            3, out_channels, 7, 2, bn_frozen=bn_frozen, as_matmul=False, rngs=rngs
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.embedder(x, mask)
        # PyTorch MaxPool2d pads with -inf, so padded cells never win.
        return jax.lax.reduce_window(
            x,
            -jnp.inf,
            jax.lax.max,
            window_dimensions=(1, 3, 3, 1),
            window_strides=(1, 2, 2, 1),
            padding=((0, 0), (1, 1), (1, 1), (0, 0)),
        )


class ShortCut(nnx.Module):
    """1x1 (possibly strided) conv + BN on the residual when its shape changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        bn_frozen: bool,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        self.convolution = Conv2d(
            in_channels, out_channels, 1, stride, as_matmul=as_matmul, rngs=rngs
        )
        self.normalization = BatchNorm(out_channels, frozen=bn_frozen)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.normalization(self.convolution(x), mask)


class ResidualLayer(nnx.Module):
    """HF ``ResNetBasicLayer`` (two 3x3) or ``ResNetBottleNeckLayer`` (1x1, 3x3, 1x1).

    Bottleneck is v1.5: the stride sits in the 3x3 conv (``downsample_in_bottleneck=False``).
    """

    def __init__(
        self,
        layer_type: LayerType,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        bn_frozen: bool,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"bn_frozen": bn_frozen, "as_matmul": as_matmul, "rngs": rngs}
        if in_channels != out_channels or stride != 1:
            self.shortcut: ShortCut | None = ShortCut(in_channels, out_channels, stride, **kw)
        else:
            self.shortcut = None
        if layer_type == LayerType.bottleneck:
            mid = out_channels // _BOTTLENECK_REDUCTION
            convs = [
                ConvLayer(in_channels, mid, 1, **kw),
                ConvLayer(mid, mid, 3, stride, **kw),
                ConvLayer(mid, out_channels, 1, relu=False, **kw),
            ]
        else:
            convs = [
                ConvLayer(in_channels, out_channels, 3, stride, **kw),
                ConvLayer(out_channels, out_channels, 3, relu=False, **kw),
            ]
        self.layer = nnx.List(convs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x, mask)
        for conv in self.layer:
            x = conv(x, mask)
        return jax.nn.relu(x + residual)


class Stage(nnx.Module):
    """``depth`` residual layers; only the first changes channels / stride."""

    def __init__(
        self,
        layer_type: LayerType,
        in_channels: int,
        out_channels: int,
        stride: int,
        depth: int,
        *,
        bn_frozen: bool,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"bn_frozen": bn_frozen, "as_matmul": as_matmul, "rngs": rngs}
        layers = [ResidualLayer(layer_type, in_channels, out_channels, stride, **kw)]
        layers += [
            ResidualLayer(layer_type, out_channels, out_channels, 1, **kw) for _ in range(depth - 1)
        ]
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Encoder(nnx.Module):
    """Stages; the first keeps the resolution (``downsample_in_first_stage=False``)."""

    def __init__(
        self,
        layer_type: LayerType,
        embedding_size: int,
        hidden_sizes: tuple[int, ...],
        depths: tuple[int, ...],
        *,
        bn_frozen: bool,
        as_matmul: bool,
        rngs: nnx.Rngs,
    ) -> None:
        ins = (embedding_size, *hidden_sizes[:-1])
        self.stages = nnx.List(
            [
                Stage(
                    layer_type,
                    cin,
                    cout,
                    1 if i == 0 else 2,
                    depth,
                    bn_frozen=bn_frozen,
                    as_matmul=as_matmul,
                    rngs=rngs,
                )
                for i, (cin, cout, depth) in enumerate(zip(ins, hidden_sizes, depths, strict=True))
            ]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for stage in self.stages:
            x = stage(x, mask)
        return x


class ResNet(nnx.Module):
    """ResNet backbone: (B, H, W, 3) normalised images → (B, hidden_sizes[-1]) pooled features.

    Built in eval mode; call ``model.train()`` before training steps and ``model.eval()``
    before evaluation. Under ``BatchNormMode.inference`` batch norm ignores the switch.
    """

    def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs) -> None:
        layer_type = LayerType(cfg.layer_type)
        hidden_sizes = tuple(int(h) for h in cfg.hidden_sizes)
        depths = tuple(int(d) for d in cfg.depths)
        if not hidden_sizes or len(hidden_sizes) != len(depths):
            raise ConfigError(
                "backbone.hidden_sizes and backbone.depths need one entry per stage "
                f"(got {list(hidden_sizes)} and {list(depths)})"
            )
        if layer_type == LayerType.bottleneck and any(
            h % _BOTTLENECK_REDUCTION for h in hidden_sizes
        ):
            raise ConfigError(
                f"backbone.hidden_sizes={list(hidden_sizes)}: bottleneck stages need widths "
                f"divisible by {_BOTTLENECK_REDUCTION}"
            )
        # A frozen backbone is a fixed function: its running statistics stay as loaded too,
        # otherwise evaluation would see a backbone that training changed.
        bn_frozen = BatchNormMode(cfg.batch_norm) == BatchNormMode.inference or bool(cfg.freeze)
        # Static description of the architecture (hashable, so the graph stays jit-cacheable).
        self.layer_type = layer_type.value
        self.embedding_size = int(cfg.embedding_size)
        self.hidden_sizes = hidden_sizes
        self.depths = depths
        self.batch_norm = BatchNormMode(cfg.batch_norm).value
        self.embedder = Embeddings(self.embedding_size, bn_frozen=bn_frozen, rngs=rngs)
        self.encoder = Encoder(
            layer_type,
            self.embedding_size,
            hidden_sizes,
            depths,
            bn_frozen=bn_frozen,
            as_matmul=bool(cfg.conv1x1_as_matmul),
            rngs=rngs,
        )

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector (what a head's first Linear takes)."""
        return self.hidden_sizes[-1]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Pooled features; ``mask`` (B,) marks the real rows of a padded batch (1 real,
        0 padding), so that padding never enters batch statistics (``BatchNormMode.batch``)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects (B, H, W, 3) NHWC images, got shape {x.shape}")
        if mask is not None and mask.shape != x.shape[:1]:
            raise ValueError(f"ResNet: mask shape {mask.shape} does not match batch {x.shape[0]}")
        x = self.embedder(x.astype(jnp.float32), mask)
        x = self.encoder(x, mask)
        return jnp.mean(x, axis=(1, 2))
