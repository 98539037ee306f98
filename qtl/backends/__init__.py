"""The study's model in PyTorch and TensorFlow, for the cross-framework benchmark (Table III).

qtl trains in JAX only (one training entry point). ``backend=torch`` and ``backend=tf`` exist
so ``mode=bench_step`` can time *the same* network in each framework: ResNet-50 v1.5 with the
same weights (the Hugging Face ``microsoft/resnet-50`` layout qtl imports), the same CDL and
dressed quantum heads, the same uint8 input batch, BCE on logits and Adam. The equivalence is
tested (``tests/test_backend_torch.py``, ``tests/test_backend_tf.py``): same weights give the
same logits, loss and gradients as the JAX model.

The frameworks are optional extras; :func:`require` turns a missing one into a message that
names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qtl.config import Backend, ConfigError, QtlConfig

# backend -> (module to import, pip extra that installs it, what the extra contains)
_EXTRAS: dict[Backend, tuple[str, str, str]] = {
    Backend.torch: ("torch", "torch", "PyTorch 2.13 CPU build"),
    Backend.tf: ("tensorflow", "tf", "tensorflow-cpu 2.21"),
}

PURPOSE = (
    "backend=torch and backend=tf run the study's model in PyTorch and TensorFlow for the "
    "cross-framework step benchmark (Table III): python launch.py mode=bench_step "
    "'bench_step.backends=[jax,torch,tf]'. Training runs in JAX only (backend=jax)."
)


def require(backend: Backend | str) -> ModuleType:
    """Import the framework behind ``backend``; a clear error naming the extra if it is absent."""
    backend = Backend(backend)
    if backend not in _EXTRAS:
        return importlib.import_module("jax")
    module, extra, what = _EXTRAS[backend]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"backend={backend.value} needs the optional extra '{extra}' ({what}), which is not "
            f"installed ({type(err).__name__}: {err}). Install it with: "
            f"pip install -e '.[{extra}]' (or '.[test]', which has both frameworks)."
        ) from err


def refuse_training(cfg: QtlConfig) -> None:
    """mode=train with another backend than JAX: say what those backends are for."""
    if cfg.backend.name != Backend.jax:
        raise ConfigError(
            f"backend={cfg.backend.name.value} cannot train: {PURPOSE} Drop backend=... "
            "(or set backend=jax) to train."
        )


def check_optimizer(cfg: QtlConfig) -> None:
    """The PyTorch and TensorFlow steps implement the study's optimiser: Adam, one rate."""
    t = cfg.train
    if t.optimizer != "adam" or (t.backbone_lr is not None and t.backbone_lr != t.lr):
        raise ConfigError(
            f"train.optimizer={t.optimizer}, train.backbone_lr={t.backbone_lr}: the PyTorch and "
            "TensorFlow steps implement the study's optimiser only (train.optimizer=adam, "
            "train.backbone_lr=null)."
        )
