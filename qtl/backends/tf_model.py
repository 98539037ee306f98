"""The study's model in TensorFlow/Keras 3: a ResNet v1.5 written here + the CDL or dressed head.

``keras.applications.ResNet50`` is v1 (stride in the first 1x1 conv, conv biases, BN eps
1.001e-5), so it cannot run the ``microsoft/resnet-50`` weights; this Keras model mirrors
transformers' ``ResNetModel`` layer for layer instead: stride in the 3x3 conv, PyTorch's
symmetric ``k // 2`` zero padding (TF's ``"SAME"`` pads bottom/right only at stride 2), max pool
padded with -inf, batch norm eps 1e-5 on running statistics, kernels (out,in,kh,kw) ->
(kh,kw,in,out). 1x1 convs run as matrix products when ``backbone.conv1x1_as_matmul`` is set,
as in the JAX model (same result; XLA's CPU conv weight gradients are slow in both).

The circuit: PennyLane's TensorFlow interface is deprecated (0.43) and unmaintained since 0.44,
``qml.qnn.KerasLayer`` is gone, and TensorFlow Quantum does not support TF 2.21; TensorCircuit-ng
would add a dependency for one circuit. So :func:`tf_circuit` is an exact state-vector
simulation in plain TF ops that executes qtl's one circuit definition
(:func:`qtl.quantum.circuit.circuit_gates`) gate by gate, as PennyLane's ``default.qubit`` does
(complex64 amplitudes, one 2x2 contraction per rotation, CNOTs as index flips, <Z> from the
probabilities). It is differentiable by ``tf.GradientTape`` and compiles under XLA
(``tf.function(jit_compile=True)``), and is tested equal to the JAX model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from qtl.backends import check_optimizer
from qtl.backends.weights import check_names
from qtl.config import BatchNormMode, ConfigError, HeadConfig, HeadName, LayerType, QtlConfig
from qtl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

_BN_EPSILON = 1e-5
_REDUCTION = 4

# canonical (PyTorch) layout <-> ours, per kind of variable
_Map = tuple[Any, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_conv = (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
_linear = (lambda a: a.T, lambda a: a.T)
_same = (lambda a: a, lambda a: a)


def device() -> str:
    """What TF runs on: its first GPU when it sees one, else the CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "CPU"


# --- the circuit --------------------------------------------------------------------------------


def _gate(name: str, angle: tf.Tensor | None) -> tf.Tensor:
    """2x2 (or batched (B, 2, 2)) complex64 matrix of one gate, PennyLane's convention."""
    if name == "Hadamard":
        return tf.constant([[1, 1], [1, -1]], tf.complex64) / math.sqrt(2.0)
    half = tf.cast(angle, tf.float32) / 2
    c, s = tf.cos(half), tf.sin(half)
    zero = tf.zeros_like(c)
    if name == "RY":
        re = tf.stack([tf.stack([c, -s], -1), tf.stack([s, c], -1)], -2)
        return tf.complex(re, tf.zeros_like(re))
    if name == "RX":
        re = tf.stack([tf.stack([c, zero], -1), tf.stack([zero, c], -1)], -2)
        im = tf.stack([tf.stack([zero, -s], -1), tf.stack([-s, zero], -1)], -2)
        return tf.complex(re, im)
    if name == "RZ":
        re = tf.stack([tf.stack([c, zero], -1), tf.stack([zero, c], -1)], -2)
        im = tf.stack([tf.stack([-s, zero], -1), tf.stack([zero, s], -1)], -2)
        return tf.complex(re, im)
    raise ValueError(f"tf_circuit: gate {name} is not simulated")


def _apply_1q(state: tf.Tensor, n: int, wire: int, matrix: tf.Tensor) -> tf.Tensor:
    """Apply a one-qubit gate on ``wire`` (wire 0 = most significant bit, as PennyLane)."""
    shape = tf.shape(state)
    s = tf.reshape(state, [-1, 2**wire, 2, 2 ** (n - wire - 1)])
    spec = "bij,bajc->baic" if matrix.shape.rank == 3 else "ij,bajc->baic"
    return tf.reshape(tf.einsum(spec, matrix, s), shape)


def _apply_cnot(state: tf.Tensor, n: int, control: int, target: int) -> tf.Tensor:
    """Flip ``target`` where ``control`` is 1: split on the control bit, reverse the target axis."""
    shape = tf.shape(state)
    lo, hi = sorted((control, target))
    s = tf.reshape(state, [-1, 2**lo, 2, 2 ** (hi - lo - 1), 2, 2 ** (n - hi - 1)])
    c_axis, t_axis = (2, 4) if control < target else (4, 2)
    zero, one = tf.unstack(s, axis=c_axis)
    t_axis_after = t_axis if t_axis < c_axis else t_axis - 1
    one = tf.reverse(one, axis=[t_axis_after])
    return tf.reshape(tf.stack([zero, one], axis=c_axis), shape)


def tf_circuit(spec: Any) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``f(angles (B, n), theta) -> <Z> (B, n)``: qtl's gate list, gate by gate, in TF."""
    from qtl.quantum.circuit import circuit_gates

    n = spec.n_qubits
    ops = [(op.name, op.wires, op.param) for op in circuit_gates(spec)]

    def run(x: tf.Tensor, theta: tf.Tensor) -> tf.Tensor:
        batch = tf.shape(x)[0]
        state = tf.concat(
            [tf.ones([batch, 1], tf.complex64), tf.zeros([batch, 2**n - 1], tf.complex64)], 1
        )
        for name, wires, symbol in ops:
            if name == "CNOT":
                state = _apply_cnot(state, n, wires[0], wires[1])
                continue
            angle = None
            if symbol is not None:
                angle = x[:, symbol.index[0]] if symbol.array == "x" else theta[symbol.index]
            state = _apply_1q(state, n, wires[0], _gate(name, angle))
        probs = tf.math.real(state * tf.math.conj(state))
        z = []
        for wire in range(n):
            p = tf.reduce_sum(tf.reshape(probs, [-1, 2**wire, 2, 2 ** (n - wire - 1)]), [1, 3])
            z.append(p[:, 0] - p[:, 1])
        return tf.stack(z, axis=-1)

    return run


# --- the backbone -------------------------------------------------------------------------------


class Conv(keras.layers.Layer):
    """Bias-free square conv with PyTorch's symmetric padding (1x1 optionally as a matmul)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, as_matmul: bool) -> None:
        super().__init__()
        self.kernel = self.add_weight(
            shape=(k, k, cin, cout), initializer="he_normal", name="kernel"
        )
        self.k, self.stride, self.as_matmul = k, stride, as_matmul and k == 1

    def call(self, x: tf.Tensor) -> tf.Tensor:
        s = self.stride
        if self.as_matmul:
            if s > 1:
                x = x[:, ::s, ::s, :]
            return tf.einsum("bhwc,cd->bhwd", x, self.kernel[0, 0])
        p = self.k // 2
        return tf.nn.conv2d(x, self.kernel, s, [[0, 0], [p, p], [p, p], [0, 0]])


class BatchNorm(keras.layers.Layer):
    """Inference-mode batch norm (running statistics are not trainable), eps 1e-5."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(
            shape=(c,), initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_var = self.add_weight(
            shape=(c,), initializer="ones", trainable=False, name="moving_var"
        )

    def call(self, x: tf.Tensor) -> tf.Tensor:
        inv = self.gamma * tf.math.rsqrt(self.moving_var + _BN_EPSILON)
        return x * inv + (self.beta - self.moving_mean * inv)


class ConvLayer(keras.layers.Layer):
    """Conv -> BN -> optional ReLU, named ``prefix`` in the canonical layout."""

    def __init__(
        self, prefix: str, cin: int, cout: int, k: int, stride: int, relu: bool, as_matmul: bool
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.conv = Conv(cin, cout, k, stride, as_matmul)
        self.bn = BatchNorm(cout)
        self.relu = relu

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = self.bn(self.conv(x))
        return tf.nn.relu(x) if self.relu else x

    def weight_map(self) -> dict[str, _Map]:
        p = self.prefix
        return {
            f"{p}.convolution.weight": (self.conv.kernel, *_conv),
            f"{p}.normalization.weight": (self.bn.gamma, *_same),
            f"{p}.normalization.bias": (self.bn.beta, *_same),
            f"{p}.normalization.running_mean": (self.bn.moving_mean, *_same),
            f"{p}.normalization.running_var": (self.bn.moving_var, *_same),
        }


class Residual(keras.layers.Layer):
    """transformers' ResNetBasicLayer / ResNetBottleNeckLayer (v1.5: stride in the 3x3)."""

    def __init__(
        self, prefix: str, kind: LayerType, cin: int, cout: int, stride: int, as_matmul: bool
    ) -> None:
        super().__init__()
        kw = {"as_matmul": as_matmul}
        self.shortcut = (
            ConvLayer(f"{prefix}.shortcut", cin, cout, 1, stride, False, **kw)
            if cin != cout or stride != 1
            else None
        )
        if kind == LayerType.bottleneck:
            mid = cout // _REDUCTION
            dims = [(cin, mid, 1, 1, True), (mid, mid, 3, stride, True), (mid, cout, 1, 1, False)]
        else:
            dims = [(cin, cout, 3, stride, True), (cout, cout, 3, 1, False)]
        self.convs = [
            ConvLayer(f"{prefix}.layer.{i}", *d[:4], d[4], **kw) for i, d in enumerate(dims)
        ]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        for conv in self.convs:
            x = conv(x)
        return tf.nn.relu(x + residual)

    def conv_layers(self) -> list[ConvLayer]:
        return [*self.convs, *([self.shortcut] if self.shortcut else [])]


class ResNet(keras.layers.Layer):
    """(B, H, W, 3) normalised images -> (B, hidden_sizes[-1]) pooled features."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        kind = LayerType(cfg.layer_type)
        widths = [int(h) for h in cfg.hidden_sizes]
        depths = [int(d) for d in cfg.depths]
        emb = int(cfg.embedding_size)
        as_matmul = bool(cfg.conv1x1_as_matmul)
        self.stem = ConvLayer("backbone.embedder.embedder", 3, emb, 7, 2, True, False)
        self.blocks: list[Residual] = []
        cin = emb
        for i, (cout, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                prefix = f"backbone.encoder.stages.{i}.layers.{j}"
                self.blocks.append(Residual(prefix, kind, cin, cout, stride, as_matmul))
                cin = cout

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = self.stem(x)
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
        x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        for block in self.blocks:
            x = block(x)
        return tf.reduce_mean(x, axis=[1, 2])

    def weight_map(self) -> dict[str, _Map]:
        out = dict(self.stem.weight_map())
        for block in self.blocks:
            for conv in block.conv_layers():
                out.update(conv.weight_map())
        return out


# --- heads and the classifier -------------------------------------------------------------------


def _dense(cin: int, cout: int) -> keras.layers.Dense:
    layer = keras.layers.Dense(cout)
    layer.build((None, cin))
    return layer


def _dense_map(prefix: str, layer: keras.layers.Dense) -> dict[str, _Map]:
    return {
        f"{prefix}.weight": (layer.kernel, *_linear),
        f"{prefix}.bias": (layer.bias, *_same),
    }


class CDLHead(keras.layers.Layer):
    def __init__(self, cin: int, n: int) -> None:
        super().__init__()
        self.fc = _dense(cin, n)

    def call(self, f: tf.Tensor) -> tf.Tensor:
        return self.fc(f)

    def weight_map(self) -> dict[str, _Map]:
        return _dense_map("head.fc", self.fc)


class DQCHead(keras.layers.Layer):
    def __init__(self, cin: int, n: int, cfg: HeadConfig) -> None:
        super().__init__()
        from qtl.quantum.circuit import CircuitSpec

        spec = CircuitSpec(n, cfg.depth, str(cfg.entangler), str(cfg.rotation))
        self.pre = _dense(cin, n)
        self.theta = self.add_weight(
            shape=spec.theta_shape,
            initializer=keras.initializers.RandomNormal(stddev=2 * math.pi),
            name="theta",
        )
        self.post = _dense(n, n)
        self.circuit = tf_circuit(spec)

    def call(self, f: tf.Tensor) -> tf.Tensor:
        x = tf.tanh(self.pre(f)) * (math.pi / 2)
        return self.post(self.circuit(x, self.theta))

    def weight_map(self) -> dict[str, _Map]:
        return {
            **_dense_map("head.pre", self.pre),
            "head.theta": (self.theta, *_same),
            **_dense_map("head.post", self.post),
        }


class TFClassifier(keras.Model):
    """uint8 grayscale (B, H, W) -> logits (B, n); ``head_only``: features (B, F) -> logits."""

    def __init__(self, cfg: QtlConfig, *, head_only: bool = False) -> None:
        super().__init__()
        b = cfg.backbone
        if BatchNormMode(b.batch_norm) != BatchNormMode.inference:
            raise ConfigError(
                f"backbone.batch_norm={b.batch_norm}: the TensorFlow model runs batch norm in "
                "inference mode only (the study's fine-tuning); use backbone.batch_norm=inference."
            )
        self.head_only = head_only
        self.backbone = None if head_only else ResNet(b)
        if self.backbone is not None and b.freeze:
            self.backbone.trainable = False
        n, features = len(cfg.task.labels), int(b.hidden_sizes[-1])
        if cfg.head.name == HeadName.cdl:
            self.head = CDLHead(features, n)
        else:
            self.head = DQCHead(features, n, cfg.head)
        self.mean = tf.constant(IMAGENET_MEAN, tf.float32)
        self.std = tf.constant(IMAGENET_STD, tf.float32)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        if self.backbone is not None:
            x = tf.cast(x, tf.float32)[..., None] / 255.0  # (B, H, W, 1) -> 3 channels below
            x = self.backbone((x - self.mean) / self.std)
        return self.head(x)

    def weight_map(self) -> dict[str, _Map]:
        """Canonical name -> (variable, canonical -> ours, ours -> canonical)."""
        out = {} if self.backbone is None else self.backbone.weight_map()
        return {**out, **self.head.weight_map()}


def expected_shapes(model: TFClassifier) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(to_c(np.zeros(var.shape, np.float32)).shape)
        for k, (var, _, to_c) in model.weight_map().items()
    }


def load_weights(model: TFClassifier, weights: dict[str, np.ndarray]) -> None:
    """Copy canonically named weights (JAX export or HF checkpoint + head) into ``model``."""
    check_names(expected_shapes(model), weights)
    for key, (var, to_ours, _) in model.weight_map().items():
        var.assign(np.ascontiguousarray(to_ours(np.asarray(weights[key], np.float32))))


def build(
    cfg: QtlConfig, weights: dict[str, np.ndarray] | None = None, *, head_only: bool = False
) -> TFClassifier:
    """The Keras model, with ``weights`` when given (random otherwise)."""
    keras.utils.set_random_seed(cfg.seed)
    model = TFClassifier(cfg, head_only=head_only)
    if weights is not None:
        if head_only:
            weights = {k: v for k, v in weights.items() if k.startswith("head.")}
        load_weights(model, weights)
    return model


def _bce(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def make_step(
    model: TFClassifier, cfg: QtlConfig, *, jit_compile: bool = True
) -> Callable[[tf.Tensor, tf.Tensor], float]:
    """``step(inputs, labels) -> loss``: tape, BCE on logits, Adam; one XLA program when
    ``jit_compile``. The loss is read back after the update ran, so every call is synchronised."""
    check_optimizer(cfg)
    t = cfg.train
    # Keras' Adam folds eps into a bias-corrected rate: the same update as optax/torch up to eps
    opt = keras.optimizers.Adam(learning_rate=t.lr, epsilon=1e-8)
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step(inputs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = _bce(model(inputs), labels)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables, strict=True))
        with tf.control_dependencies([v.value for v in variables]):
            return tf.identity(loss)

    def call(inputs: tf.Tensor, labels: tf.Tensor) -> float:
        return float(step(inputs, labels).numpy())

    return call


def loss_and_grads(
    model: TFClassifier, inputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """Logits, mean BCE and the gradient of every trainable weight by canonical name."""
    with tf.GradientTape() as tape:
        logits = model(tf.constant(inputs))
        loss = _bce(logits, tf.constant(labels, tf.float32))
    wmap = {id(var): (key, to_c) for key, (var, _, to_c) in model.weight_map().items()}
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    out = {}
    for var, g in zip(variables, grads, strict=True):
        key, to_c = wmap[id(var)]
        out[key] = np.ascontiguousarray(to_c(np.asarray(g)))
    return logits.numpy(), float(loss), out
