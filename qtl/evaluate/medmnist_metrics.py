"""AUC and ACC as MedMNIST's ``Evaluator`` defines them (``getAUC``/``getACC``), per task type.

- multi-label: mean over labels of each label's ROC-AUC; ACC = mean over labels of the
  accuracy of ``score > 0.5``;
- binary: ROC-AUC and ACC (``score > 0.5``) of the positive-class score (the last column
  when there are two, e.g. softmax of two logits);
- multi-class and ordinal: mean over classes of the one-vs-rest ROC-AUC of that class's
  score; ACC of the argmax.
Scores are probabilities (:func:`qtl.train.objectives.probabilities`): a one-vs-rest AUC of raw
logits is not the same number, because softmax mixes the columns.

One deliberate difference: where a label or class has only one value in ``labels`` (a tiny
split), MedMNIST's evaluator raises; here that column is left out of the mean and counted in
``undefined``. Everywhere MedMNIST gives a number, this gives the same number.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from qtl.data.medmnist_info import Task


def _columns_auc(onehot: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    aucs, undefined = [], 0
    for j in range(scores.shape[1]):
        y = onehot[:, j]
        if y.min() == y.max():
            undefined += 1
            continue
        aucs.append(roc_auc_score(y, scores[:, j]))
    return (float(np.mean(aucs)) if aucs else float("nan")), undefined


def _check(labels: np.ndarray, scores: np.ndarray, task: Task) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows, scores {scores.shape[0]}")
    if task == Task.multi_label and labels.shape[1] != scores.shape[1]:
        raise ValueError(f"multi-label: labels {labels.shape} and scores {scores.shape} differ")
    if task in (Task.multi_class, Task.ordinal) and labels.shape[1] != 1:
        raise ValueError(f"{task}: labels must be one class index per row, got {labels.shape}")
    if task == Task.binary and scores.shape[1] > 2:
        raise ValueError(f"binary: scores must have 1 or 2 columns, got {scores.shape}")
    return labels, scores


def auc_detail(labels: np.ndarray, scores: np.ndarray, task: Task | str) -> tuple[float, int]:
    """(AUC, number of columns left out because their labels have one value)."""
    task = Task(task)
    labels, scores = _check(labels, scores, task)
    if task == Task.multi_label:
        return _columns_auc(labels, scores)
    if task == Task.binary:
        y = labels[:, 0]
        if y.min() == y.max():
            return float("nan"), 1
        return float(roc_auc_score(y, scores[:, -1])), 0
    onehot = labels[:, 0][:, None] == np.arange(scores.shape[1])[None, :]
    return _columns_auc(onehot.astype(np.int64), scores)


def get_auc(labels: np.ndarray, scores: np.ndarray, task: Task | str) -> float:
    """MedMNIST's AUC for ``task`` (see the module docstring)."""
    return auc_detail(labels, scores, task)[0]


def get_acc(
    labels: np.ndarray, scores: np.ndarray, task: Task | str, threshold: float = 0.5
) -> float:
    """MedMNIST's ACC for ``task``: thresholded (multi-label, binary) or argmax (others)."""
    task = Task(task)
    labels, scores = _check(labels, scores, task)
    if task == Task.multi_label:
        return float(np.mean((scores > threshold) == (labels > 0)))
    if task == Task.binary:
        return float(np.mean((scores[:, -1] > threshold) == (labels[:, 0] > 0)))
    return float(np.mean(np.argmax(scores, axis=-1) == labels[:, 0]))


def evaluate(labels: np.ndarray, scores: np.ndarray, task: Task | str) -> dict[str, float | int]:
    """``{"auc", "acc", "auc_undefined"}`` of one split: what a run records per split."""
    auc, undefined = auc_detail(labels, scores, task)
    return {"auc": auc, "acc": get_acc(labels, scores, task), "auc_undefined": undefined}
