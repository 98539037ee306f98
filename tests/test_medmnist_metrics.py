"""AUC and ACC equal MedMNIST's evaluator on random predictions for every task type.

Two references: an independent computation written here (AUC as the Mann-Whitney rank
statistic, accuracy counted by hand), always; and ``medmnist.evaluator.getAUC/getACC`` where
the ``medmnist`` package is installed (test-only: ``pip install --no-deps medmnist==3.0.2``;
its runtime dependencies, torchvision among them, are not needed for these two functions).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from qtl.data.medmnist_info import MEDMNIST_TASK, Task
from qtl.evaluate.medmnist_metrics import auc_detail, evaluate, get_acc, get_auc


def _mann_whitney(y: np.ndarray, s: np.ndarray) -> float:
    ranks = rankdata(s)
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _case(task: Task, n: int = 200, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    if task == Task.multi_label:
        labels = (rng.uniform(size=(n, k)) < 0.3).astype(np.uint8)
        scores = 1 / (1 + np.exp(-rng.normal(size=(n, k)) - 0.8 * labels))
    elif task == Task.binary:
        labels = rng.integers(0, 2, (n, 1)).astype(np.uint8)
        scores = 1 / (1 + np.exp(-rng.normal(size=(n, 1)) - labels))
    else:
        labels = rng.integers(0, k, (n, 1)).astype(np.uint8)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), labels[:, 0]] += 0.7
        scores = _softmax(logits)
    return labels, scores


def _independent(task: Task, labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if task == Task.multi_label:
        auc = np.mean([_mann_whitney(labels[:, j], scores[:, j]) for j in range(labels.shape[1])])
        acc = np.mean(
            [np.mean((scores[:, j] > 0.5) == labels[:, j]) for j in range(labels.shape[1])]
        )
    elif task == Task.binary:
        auc = _mann_whitney(labels[:, 0], scores[:, -1])
        acc = np.mean((scores[:, -1] > 0.5) == labels[:, 0])
    else:
        y = labels[:, 0]
        k = scores.shape[1]
        auc = np.mean([_mann_whitney((y == c).astype(int), scores[:, c]) for c in range(k)])
        acc = np.mean(scores.argmax(-1) == y)
    return float(auc), float(acc)


@pytest.mark.parametrize("task", list(Task))
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_an_independent_computation(task, seed):
    labels, scores = _case(task, seed=seed)
    auc, acc = _independent(task, labels, scores)
    assert get_auc(labels, scores, task) == pytest.approx(auc, abs=1e-12)
    assert get_acc(labels, scores, task) == pytest.approx(acc, abs=1e-12)
    assert 0.5 < auc < 1.0  # the case has signal: a swapped column would show


def test_binary_reads_the_positive_column_of_two():
    labels, p = _case(Task.binary, seed=3)
    two = np.concatenate([1 - p, p], axis=1)  # softmax of two logits
    assert get_auc(labels, two, "binary") == get_auc(labels, p, "binary")
    assert get_acc(labels, two, "binary") == get_acc(labels, p, "binary")
    assert get_auc(labels, 1 - two, "binary") == pytest.approx(1 - get_auc(labels, p, "binary"))


def test_one_valued_columns_are_left_out_and_counted():
    labels, scores = _case(Task.multi_class, k=4, seed=4)
    labels[labels == 3] = 2  # class 3 absent: MedMNIST's evaluator would raise here
    auc, undefined = auc_detail(labels, scores, "multi-class")
    expected = np.mean(
        [_mann_whitney((labels[:, 0] == c).astype(int), scores[:, c]) for c in (0, 1, 2)]
    )
    assert undefined == 1 and auc == pytest.approx(expected)
    assert evaluate(labels, scores, "multi-class")["auc_undefined"] == 1


def test_shape_errors_say_what_is_wrong():
    labels, scores = _case(Task.multi_label)
    with pytest.raises(ValueError, match="multi-label"):
        get_auc(labels, scores[:, :3], "multi-label")
    with pytest.raises(ValueError, match="rows"):
        get_acc(labels[:10], scores, "multi-label")
    with pytest.raises(ValueError, match="'regression' is not a valid Task"):
        get_auc(labels, scores, "regression")


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """medmnist.evaluator without running the package's __init__ (it imports torch and
    torchvision) and, where pandas is missing, with a stand-in for its unused pandas import.
    HOME points at a scratch folder meanwhile: medmnist.info creates ~/.medmnist on import."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("medmnist not installed (test-only: pip install --no-deps medmnist==3.0.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    saved = {k: sys.modules.get(k) for k in ("medmnist", "medmnist.info", "pandas")}
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    try:
        package = types.ModuleType("medmnist")
        package.__path__ = [str(folder)]
        sys.modules["medmnist"] = package
        if importlib.util.find_spec("pandas") is None:
            sys.modules["pandas"] = types.ModuleType("pandas")
        loader = importlib.util.spec_from_file_location(
            "medmnist_evaluator", folder / "evaluator.py"
        )
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module
    finally:
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize("task", list(Task))
def test_metrics_equal_medmnist_evaluator(task, evaluator):
    for seed in range(3):
        labels, scores = _case(task, seed=seed)
        name = MEDMNIST_TASK[task]
        assert get_auc(labels, scores, task) == pytest.approx(
            evaluator.getAUC(labels, scores, name), abs=1e-12
        )
        assert get_acc(labels, scores, task) == pytest.approx(
            evaluator.getACC(labels, scores, name), abs=1e-12
        )
    if task == Task.binary:  # two columns, as MedMNIST's own baselines produce
        two = np.concatenate([1 - scores, scores], axis=1)
        assert get_auc(labels, two, task) == pytest.approx(
            evaluator.getAUC(labels, two, "binary-class"), abs=1e-12
        )
