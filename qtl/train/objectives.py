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
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qtl.config import DistillMode
from qtl.data.medmnist_info import FlagInfo, Task


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


# ----------------------------------------------------------------------------- the objective


def masked_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean binary cross-entropy over labels and over the real (unmasked) rows.

    Padding rows are selected out (not multiplied by 0), so whatever they hold cannot turn
    the loss or its gradient into NaN.
    """
    per_row = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    return jnp.where(mask > 0, per_row * mask, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)


@dataclass(frozen=True)
class Objective:
    """What one run's jitted steps optimise and how its evaluation scores a split.

    This base is the CXR study's: one sigmoid per label, BCE, mean AUROC. A study with another
    loss or other scores subclasses it (:class:`TaskObjective`); the steps and the loop only
    call these four methods.
    """

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8-valued float images -> the model's input."""
        from qtl.data.preprocess import normalize

        return normalize(images)

    def train_loss(
        self, logits: jax.Array, targets: jax.Array, mask: jax.Array, step: jax.Array
    ) -> jax.Array:
        """The training loss of one padded batch (``step``: the optimiser step before it)."""
        return masked_bce(logits, targets, mask)

    def eval_outputs(
        self, logits: jax.Array, labels: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(scores, summed label loss over the real rows) of one padded eval batch."""
        per_row = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1) * mask
        return jax.nn.sigmoid(logits), per_row.sum()

    def scores(self, logits: jax.Array) -> jax.Array:
        """The probabilities :meth:`eval_outputs` reports, without labels (mode=predict)."""
        return jax.nn.sigmoid(logits)

    def score(self, labels, scores, names) -> tuple[float | None, dict, dict[str, Any]]:
        """(the split's AUC, AUC per label, extra metrics) on host arrays: mean and per-label
        AUROC."""
        from qtl.evaluate.metrics import mean_auroc, per_label_auroc

        per_label = per_label_auroc(labels, scores, names)
        return mean_auroc(per_label), per_label, {}


@dataclass(frozen=True)
class TaskObjective(Objective):
    """MedMNIST: the task type's loss (:func:`label_loss`), MedMNIST's AUC and ACC, and with
    distillation the teacher's logits carried in the training targets after the ``n_labels``
    label columns, so they follow every example through shuffling, padding and resume without
    a second input stream."""

    task: Task | None = None  # MedMNIST task type
    n_labels: int = 1  # label columns of the targets
    distill: str = "none"  # none | joint | pretrain
    temperature: float = 4.0
    alpha: float = 0.0
    kd_steps: int = 0  # pretrain: optimiser steps of pure KD before the label loss only

    def normalize(self, images: jax.Array) -> jax.Array:
        """MedMNIST's transform: mean 0.5, std 0.5, channels as stored."""
        return images * (2.0 / 255.0) - 1.0

    def train_loss(
        self, logits: jax.Array, targets: jax.Array, mask: jax.Array, step: jax.Array
    ) -> jax.Array:
        labels = targets[:, : self.n_labels]
        if self.distill == DistillMode.none:
            return label_loss(self.task, logits, labels, mask)
        teacher = targets[:, self.n_labels :]
        if self.distill == DistillMode.pretrain:
            soft = soft_term(self.task, logits, teacher, self.temperature, mask)
            return jnp.where(
                step < self.kd_steps, soft, label_loss(self.task, logits, labels, mask)
            )
        return distill_loss(
            self.task,
            logits,
            teacher,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            mask=mask,
        )

    def eval_outputs(
        self, logits: jax.Array, labels: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        loss = label_loss(self.task, logits, labels, mask) * jnp.maximum(mask.sum(), 1.0)
        return probabilities(self.task, logits), loss

    def scores(self, logits: jax.Array) -> jax.Array:
        return probabilities(self.task, logits)

    def score(self, labels, scores, names) -> tuple[float | None, dict, dict[str, Any]]:
        """MedMNIST's AUC and ACC (its ``Evaluator``'s definitions); no per-label AUROC."""
        import numpy as np

        from qtl.evaluate.medmnist_metrics import evaluate

        m = evaluate(labels, scores, self.task)
        auc = None if not np.isfinite(m["auc"]) else float(m["auc"])
        extra = {"auc": auc, "acc": float(m["acc"]), "auc_undefined": int(m["auc_undefined"])}
        return auc, {}, extra
