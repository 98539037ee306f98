"""Training objectives of the MedMNIST study: the label loss per task type and the KD loss.

- multi-class and ordinal: softmax cross-entropy on integer classes (the MedMNIST v2
  baselines train ordinal RetinaMNIST as multi-class too);
- binary: one logit and sigmoid BCE by default (``binary_logits=1``); with two logits, softmax
  cross-entropy as MedMNIST v2's baselines do. Either way :func:`probabilities` returns the
  positive-class score in the last column, which is the column MedMNIST's metric reads;
- multi-label: mean sigmoid BCE over labels and examples.

Knowledge distillation (Hinton et al.): ``alpha * T^2 * KL(teacher_T || student_T) + (1 -
alpha) * label_loss``, where ``_T`` means logits divided by the temperature T before the
softmax (multi-class, ordinal, two-logit binary) or, per label, before the sigmoid
(multi-label, one-logit binary). KL is the soft-target cross-entropy minus the teacher's own
entropy: the same gradients, and zero when the student matches the teacher. T^2 keeps the soft
term's gradient scale independent of T. ``alpha = 1`` is pure distillation (the first phase of
``distill=pretrain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from qtl.data.medmnist_info import FlagInfo, Task

DISTILL_MODES = ("none", "joint", "pretrain")


@dataclass
class DistillConfig:
    """``distill=none | joint | pretrain``: the KD term and how it enters training."""

    mode: str = "none"  # none | joint (KD + labels throughout) | pretrain (KD first, then labels)
    temperature: float = 4.0  # T: both logits divided by T before the softmax/sigmoid
    alpha: float = 0.7  # joint: weight of the T^2-scaled KD term; 1 - alpha on the label loss
    pretrain_epochs: int = 10  # pretrain: epochs of pure KD (alpha = 1) before label training
    teacher: str = "resnet18"  # a model preset trained on the same data, or a run directory


def validate_distill(cfg: DistillConfig) -> None:
    """Field errors at build time."""
    if cfg.mode not in DISTILL_MODES:
        raise ValueError(f"distill.mode='{cfg.mode}' is not one of: {', '.join(DISTILL_MODES)}")
    if cfg.temperature <= 0:
        raise ValueError(f"distill.temperature={cfg.temperature}, expected > 0")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"distill.alpha={cfg.alpha}, expected a value in [0, 1]")
    if cfg.pretrain_epochs < 0:
        raise ValueError(f"distill.pretrain_epochs={cfg.pretrain_epochs}, expected >= 0")


def n_outputs(info: FlagInfo, binary_logits: int = 1) -> int:
    """Logits the classifier needs for ``info``'s task."""
    if info.task == Task.binary:
        if binary_logits not in (1, 2):
            raise ValueError(f"binary_logits={binary_logits}, expected 1 or 2")
        return binary_logits
    return info.n_classes


def _softmax_task(task: Task, logits: jax.Array) -> bool:
    if task == Task.multi_label:
        return False
    if task == Task.binary:
        if logits.shape[-1] not in (1, 2):
            raise ValueError(f"binary: expected 1 or 2 logits, got {logits.shape[-1]}")
        return logits.shape[-1] == 2
    return True


def _mean(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over examples; with ``mask`` (B,) over the real rows only (a padded last batch)."""
    if mask is None:
        return per_example.mean()
    mask = mask.astype(per_example.dtype)
    return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def label_loss(
    task: Task | str, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean loss of ``logits`` (B, K) against reader-format ``labels`` (B, L) integers."""
    task = Task(task)
    if _softmax_task(task, logits):
        classes = labels[:, 0].astype(jnp.int32)
        per = optax.softmax_cross_entropy_with_integer_labels(logits, classes)
    else:
        per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean(-1)
    return _mean(per, mask)


def probabilities(task: Task | str, logits: jax.Array) -> jax.Array:
    """The scores MedMNIST's metric reads: softmax, or per-column sigmoid."""
    task = Task(task)
    if _softmax_task(task, logits):
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def soft_term(
    task: Task | str,
    student: jax.Array,
    teacher: jax.Array,
    temperature: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    """T^2 * KL(teacher_T || student_T), mean over examples (and labels, for sigmoids)."""
    task = Task(task)
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {student.shape} and teacher logits {teacher.shape}")
    t = jnp.asarray(temperature, student.dtype)
    s, k = student / t, jax.lax.stop_gradient(teacher).astype(student.dtype) / t
    if _softmax_task(task, student):
        p = jax.nn.softmax(k, axis=-1)
        kl = jnp.sum(p * (jax.nn.log_softmax(k, -1) - jax.nn.log_softmax(s, -1)), axis=-1)
    else:
        p = jax.nn.sigmoid(k)
        # Bernoulli KL per label: BCE(student, p) - H(p)
        kl = optax.sigmoid_binary_cross_entropy(s, p) - optax.sigmoid_binary_cross_entropy(k, p)
        kl = kl.mean(-1)
    return t * t * _mean(kl, mask)


def distill_loss(
    task: Task | str,
    student: jax.Array,
    teacher: jax.Array,
    labels: jax.Array,
    *,
    temperature: float,
    alpha: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``alpha * soft_term + (1 - alpha) * label_loss`` (``alpha`` in [0, 1], T > 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill.alpha={alpha}, expected a value in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distill.temperature={temperature}, expected > 0")
    soft = soft_term(task, student, teacher, temperature, mask)
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * label_loss(task, student, labels, mask)
