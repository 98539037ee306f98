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
import importlib.util
from types import ModuleType

from qtl.config import Backend, ConfigError, QtlConfig

# backend -> (module to import, pip extra that installs it, what the extra contains)
_EXTRAS: dict[Backend, tuple[str, str, str]] = {
    Backend.torch: ("torch", "torch", "PyTorch and transformers"),
    Backend.tf: ("tensorflow", "tf", "TensorFlow 2.21"),
}
# modules the backend's model also needs (the PyTorch ResNet is transformers')
_ALSO: dict[Backend, tuple[str, ...]] = {Backend.torch: ("transformers",)}

PURPOSE = (
    "backend=torch and backend=tf run the study's model in PyTorch and TensorFlow for the "
    "cross-framework step benchmark (Table III): python launch.py mode=bench_step "
    "'bench_step.backends=[jax,torch,tf]'. Training runs in JAX only (backend=jax)."
)


def _missing(backend: Backend, err: Exception | None) -> ConfigError:
    _, extra, what = _EXTRAS[backend]
    why = f" ({type(err).__name__}: {err})" if err else ""
    return ConfigError(
        f"backend={backend.value} needs the optional extra '{extra}' ({what}), which is not "
        f"installed{why}. Install it with: pip install -e '.[{extra}]' "
        "(or '.[test]', which has both frameworks)."
    )


def check_installed(backend: Backend | str) -> None:
    """Fail early, without importing the framework, when its extra is not installed."""
    backend = Backend(backend)
    if backend not in _EXTRAS:
        return
    for module in (_EXTRAS[backend][0], *_ALSO.get(backend, ())):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as err:
            raise _missing(backend, err) from err
        if not found:
            raise _missing(backend, ModuleNotFoundError(f"No module named '{module}'"))


def require(backend: Backend | str) -> ModuleType:
    """Import the framework behind ``backend``; a clear error naming the extra if it is absent."""
    backend = Backend(backend)
    if backend not in _EXTRAS:
        return importlib.import_module("jax")
    try:
        framework = importlib.import_module(_EXTRAS[backend][0])
        for module in _ALSO.get(backend, ()):
            importlib.import_module(module)
    except ImportError as err:
        raise _missing(backend, err) from err
    return framework


def refuse_training(cfg: QtlConfig) -> None:
    """mode=train with another backend than JAX: say what those backends are for."""
    if cfg.backend.name != Backend.jax:
        raise ConfigError(
            f"backend={cfg.backend.name.value} cannot train: {PURPOSE} Drop backend=... "
            "(or set backend=jax) to train."
        )


def refuse_outside_bench(cfg: QtlConfig) -> None:
    """Any mode but ``bench_step`` with another backend than JAX: refuse rather than ignore.

    Only the step benchmark has PyTorch and TensorFlow models; ``describe``, the other
    benchmarks, the cache and the report run qtl's JAX code whatever ``backend`` says, so a
    silent run would report JAX numbers under a PyTorch or TF label.
    """
    from qtl.config import Mode

    if cfg.backend.name == Backend.jax or cfg.mode == Mode.bench_step:
        return
    if cfg.mode == Mode.train:
        refuse_training(cfg)
    raise ConfigError(
        f"backend={cfg.backend.name.value} has no mode={cfg.mode.value}: {PURPOSE} Drop "
        f"backend=... (or set backend=jax) for mode={cfg.mode.value}, which runs in JAX."
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
