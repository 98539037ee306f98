"""The study's model in PyTorch: transformers' ``ResNetModel`` (v1.5) + the CDL or dressed head.

Same architecture and weight layout as the JAX model (:mod:`qtl.backends.weights`), the same
circuit definition (:func:`qtl.quantum.circuit.dqc_ansatz`, run by PennyLane ``default.qubit``
with ``interface="torch"`` and backprop, the study's route), BCE on logits and Adam. The
model takes the uint8 grayscale batch the JAX step takes; normalisation and the channel copy
happen inside. Batch norm stays in inference mode (the study's fine-tuning setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtl.backends import check_optimizer
from qtl.backends.weights import check_names
from qtl.config import BatchNormMode, ConfigError, HeadConfig, HeadName, QtlConfig
from qtl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def device() -> torch.device:
    """The GPU when PyTorch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_circuit(spec: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(angles (B, n), theta) -> <Z> (B, n)``: default.qubit, torch interface, backprop.

    PennyLane promotes the float32 inputs to float64/complex128; the result is cast back.
    """
    import pennylane as qml

    from qtl.quantum.circuit import dqc_ansatz

    dev = qml.device("default.qubit", wires=spec.n_qubits)

    @qml.qnode(dev, interface="torch", diff_method="backprop")
    def qnode(x: torch.Tensor, theta: torch.Tensor) -> list:
        dqc_ansatz(x, theta, spec)
        return [qml.expval(qml.PauliZ(w)) for w in range(spec.n_qubits)]

    # Dynamo cannot trace PennyLane (torch 2.13, PennyLane 0.45: a TypeError inside its tape
    # code), so under torch.compile the circuit is a graph break and runs eagerly.
    @torch.compiler.disable
    def run(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(qnode(x, theta)), dim=-1).to(x.dtype)

    return run


class CDLHead(nn.Module):
    """Linear(features -> n); the sigmoid lives in the loss."""

    def __init__(self, in_features: int, n_labels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, n_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class DQCHead(nn.Module):
    """Linear -> tanh*pi/2 -> circuit <Z> -> Linear, one qubit per label."""

    def __init__(self, in_features: int, n_labels: int, cfg: HeadConfig) -> None:
        super().__init__()
        from qtl.quantum.circuit import CircuitSpec

        spec = CircuitSpec(n_labels, cfg.depth, str(cfg.entangler), str(cfg.rotation))
        self.pre = nn.Linear(in_features, n_labels)
        self.theta = nn.Parameter(2 * math.pi * torch.randn(spec.theta_shape))
        self.post = nn.Linear(n_labels, n_labels)
        self.circuit = torch_circuit(spec)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.pre(features)) * (math.pi / 2)
        return self.post(self.circuit(x, self.theta))


class TorchClassifier(nn.Module):
    """uint8 grayscale (B, H, W) -> logits (B, n); ``head_only``: features (B, F) -> logits."""

    def __init__(self, cfg: QtlConfig, *, head_only: bool = False) -> None:
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        b = cfg.backbone
        if BatchNormMode(b.batch_norm) != BatchNormMode.inference:
            raise ConfigError(
                f"backbone.batch_norm={b.batch_norm}: the PyTorch model runs batch norm in "
                "inference mode only (the study's fine-tuning); use backbone.batch_norm=inference."
            )
        self.head_only = head_only
        self.freeze = bool(b.freeze)
        if not head_only:
            self.backbone = ResNetModel(
                ResNetConfig(
                    num_channels=3,
                    embedding_size=int(b.embedding_size),
                    hidden_sizes=[int(h) for h in b.hidden_sizes],
                    depths=[int(d) for d in b.depths],
                    layer_type=str(b.layer_type),
                )
            )
            if self.freeze:
                self.backbone.requires_grad_(False)
        n = len(cfg.task.labels)
        features = int(b.hidden_sizes[-1])
        if cfg.head.name == HeadName.cdl:
            self.head: nn.Module = CDLHead(features, n)
        else:
            self.head = DQCHead(features, n, cfg.head)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()  # batch norm on running statistics; there is no dropout

    def train(self, mode: bool = True) -> TorchClassifier:
        """Batch norm stays in inference mode whatever the caller asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.head_only:
            x = x.to(torch.float32).div(255.0).unsqueeze(1)  # (B, 1, H, W) -> 3 channels below
            x = (x - self.mean) / self.std
            x = self.backbone(x).pooler_output.flatten(1)
            if self.freeze:
                x = x.detach()
        return self.head(x)


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every weight the model loads."""
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def load_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy canonically named weights (JAX export or HF checkpoint + head) into ``model``."""
    check_names(expected_shapes(model), weights)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
    model.load_state_dict(state, strict=False)  # only num_batches_tracked is left out


def build(
    cfg: QtlConfig, weights: dict[str, np.ndarray] | None = None, *, head_only: bool = False
) -> TorchClassifier:
    """The model on :func:`device`, with ``weights`` when given (random otherwise)."""
    torch.manual_seed(cfg.seed)
    model = TorchClassifier(cfg, head_only=head_only)
    if weights is not None:
        if head_only:
            weights = {k: v for k, v in weights.items() if k.startswith("head.")}
        load_weights(model, weights)
    return model.to(device())


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU, where PyTorch runs eagerly)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_step(
    model: TorchClassifier, cfg: QtlConfig, *, compile: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(inputs, labels) -> loss``: forward, BCE on logits, backward, Adam, synchronised.

    ``compile=True`` runs the model through ``torch.compile``; the optimiser update stays eager.
    """
    check_optimizer(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.train.lr)  # eps 1e-8 and update rule as optax.adam
    forward = torch.compile(model) if compile else model

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(forward(inputs), labels)
        loss.backward()
        opt.step()
        synchronize()
        return loss.detach()

    return step


def loss_and_grads(
    model: TorchClassifier, inputs: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """Logits, mean BCE and the gradient of every trainable weight by canonical name."""
    dev = device()
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(np.asarray(inputs)).to(dev))
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).to(dev))
    loss.backward()
    grads = {
        k: p.grad.detach().cpu().numpy() for k, p in model.named_parameters() if p.grad is not None
    }
    return logits.detach().cpu().numpy(), loss.item(), grads
