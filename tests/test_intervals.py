"""The report's uncertainty: DeLong intervals for an AUROC and multiplicity-adjusted p-values.

Each is checked against a reference computed another way: DeLong's components against the
explicit all-pairs kernel, its standard error against a bootstrap over test images, BH
against scipy, and Holm against its step-down rejection rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from qtl.evaluate.intervals import delong_components, delong_interval, roc_points
from qtl.report.stats import adjust_pvalues


def _sample(rng: np.random.Generator, m: int, n: int, shift: float, ties: bool = False):
    pos = rng.normal(shift, 1.0, m)
    neg = rng.normal(0.0, 1.0, n)
    scores = np.concatenate([pos, neg])
    if ties:  # coarse scores: many ties within and across classes
        scores = np.round(scores * 2) / 2
    labels = np.concatenate([np.ones(m), np.zeros(n)])
    perm = rng.permutation(m + n)
    return labels[perm], scores[perm]


def _pairwise(labels: np.ndarray, scores: np.ndarray):
    """The O(m n) definition: psi(x, y) = 1 if x > y, 1/2 if equal, 0 otherwise."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


@pytest.mark.parametrize("ties", [False, True])
def test_delong_components_equal_the_pairwise_kernel(ties):
    rng = np.random.default_rng(3)
    labels, scores = _sample(rng, 37, 91, 0.8, ties)
    auc, v10, v01 = delong_components(labels, scores)
    ref_auc, ref_v10, ref_v01 = _pairwise(labels, scores)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # components follow the order of positives / negatives as they appear
    np.testing.assert_allclose(v10, ref_v10, atol=1e-12)
    np.testing.assert_allclose(v01, ref_v01, atol=1e-12)


def test_delong_se_matches_a_bootstrap_over_images():
    rng = np.random.default_rng(11)
    labels, scores = _sample(rng, 150, 450, 1.0)
    ci = delong_interval(labels, scores)
    pos, neg = scores[labels == 1], scores[labels == 0]
    boot = []
    for _ in range(2000):  # stratified: the class counts of the test set are fixed
        bp = pos[rng.integers(0, len(pos), len(pos))]
        bn = neg[rng.integers(0, len(neg), len(neg))]
        boot.append(_pairwise(np.r_[np.ones(len(bp)), np.zeros(len(bn))], np.r_[bp, bn])[0])
    assert ci.se == pytest.approx(float(np.std(boot, ddof=1)), rel=0.1)
    assert ci.low < ci.auc < ci.high
    z = stats.norm.ppf(0.975)
    assert ci.high - ci.low == pytest.approx(2 * z * ci.se, rel=1e-9)
    assert (ci.positives, ci.negatives) == (150, 450)


def test_delong_interval_is_clipped_and_refuses_one_class():
    labels = np.array([1, 1, 0, 0, 0])
    ci = delong_interval(labels, np.array([0.9, 0.8, 0.1, 0.2, 0.3]))
    assert ci.auc == 1.0 and ci.high == 1.0 and 0.0 <= ci.low <= 1.0
    with pytest.raises(ValueError, match="single class"):
        delong_interval(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="level"):
        delong_interval(labels, np.arange(5.0), level=1.5)


def test_roc_points_run_from_origin_to_one():
    rng = np.random.default_rng(0)
    labels, scores = _sample(rng, 20, 30, 1.0)
    fpr, tpr = roc_points(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores))


def _holm_rejects(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as a rule: reject p_(1..k) while p_(i) <= alpha / (m - i + 1)."""
    order = np.argsort(p)
    reject = np.zeros(len(p), bool)
    for i, j in enumerate(order):
        if p[j] > alpha / (len(p) - i):
            break
        reject[j] = True
    return reject


def test_holm_adjusted_p_values_reproduce_the_step_down_rule():
    rng = np.random.default_rng(5)
    for _ in range(50):
        p = np.concatenate([rng.uniform(0, 0.02, 4), rng.uniform(0, 1, 8)])
        adj = np.array(adjust_pvalues(p, "holm"))
        assert np.all(adj >= p - 1e-15) and np.all(adj <= 1.0)
        for alpha in (0.01, 0.05, 0.1):
            np.testing.assert_array_equal(adj <= alpha, _holm_rejects(p, alpha))


def test_bh_equals_scipy_and_nan_is_left_out():
    rng = np.random.default_rng(7)
    p = rng.uniform(0, 0.2, 15)
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), stats.false_discovery_control(p))
    with_nan = [0.01, math.nan, 0.04, 0.03]
    got = adjust_pvalues(with_nan, "bh")
    assert math.isnan(got[1])
    np.testing.assert_allclose(
        [got[0], got[2], got[3]], stats.false_discovery_control([0.01, 0.04, 0.03])
    )
    assert adjust_pvalues(with_nan, "none")[2] == 0.04
    with pytest.raises(ValueError):
        adjust_pvalues([0.1], "bonferonni")
