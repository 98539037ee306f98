"""CDL vs DQC over matched seeds: difference, % difference and a paired t-test.

Pairing is by seed: the same seed gives both heads the same initial backbone, batch order and
augmentation, so the per-seed difference removes that shared noise. A seed counts only when
both heads have a value for it (complete pairs); the others are reported, never imputed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from qtl.report.collect import Sweep


def pct_diff(a: float, b: float) -> float:
    """% difference of A over B relative to their mean: 100 * 2(A - B) / (A + B)."""
    return 100.0 * 2.0 * (a - b) / (a + b)


def stars(p: float, alpha: float = 0.05) -> str:
    """``***`` p<0.001, ``**`` p<0.01, ``*`` p<alpha, ``ns`` otherwise, ``""`` when undefined."""
    if not math.isfinite(p):
        return ""
    if p < min(alpha, 0.001):
        return "***"
    if p < min(alpha, 0.01):
        return "**"
    return "*" if p < alpha else "ns"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    """Head A (CDL) against head B (DQC) over the seeds where both have a value."""

    seeds: tuple[int, ...]
    mean_a: float
    sd_a: float
    mean_b: float
    sd_b: float
    diff: float  # mean of A - B over the pairs
    pct_diff: float  # 2(mean A - mean B) / (mean A + mean B), in percent
    t: float
    p: float  # two-sided paired t-test; nan with fewer than two pairs

    @property
    def n(self) -> int:
        return len(self.seeds)

    def stars(self, alpha: float = 0.05) -> str:
        return stars(self.p, alpha)


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> Paired:
    """Paired t-test of ``a`` against ``b`` (seed -> value) on their complete seed pairs."""
    seeds = tuple(sorted(s for s in a if s in b and a[s] is not None and b[s] is not None))
    xa = [float(a[s]) for s in seeds]  # type: ignore[arg-type]
    xb = [float(b[s]) for s in seeds]  # type: ignore[arg-type]
    mean_a, sd_a = mean_sd(xa)
    mean_b, sd_b = mean_sd(xb)
    t = p = math.nan
    if len(seeds) >= 2:
        with warnings.catch_warnings():  # identical differences: scipy's own nan/inf, kept
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_rel(xa, xb)
        t, p = float(res.statistic), float(res.pvalue)
    diff = float(np.mean(np.subtract(xa, xb))) if seeds else math.nan
    pct = pct_diff(mean_a, mean_b) if seeds else math.nan
    return Paired(seeds, mean_a, sd_a, mean_b, sd_b, diff, pct, t, p)


class Adjust(StrEnum):
    """How p-values tested together are adjusted for multiplicity."""

    holm = "holm"  # family-wise error (Holm 1979, step-down Bonferroni): any false call
    bh = "bh"  # false discovery rate (Benjamini & Hochberg 1995): the share of false calls
    none = "none"


def adjust_pvalues(pvalues: Sequence[float], method: Adjust | str = Adjust.holm) -> list[float]:
    """Adjusted p-values of one family of tests; undefined (nan) ones stay nan, uncounted.

    A family is what a reader scans at once: every label of one task and test set. Holm keeps
    the chance of any false "significant" at alpha; BH controls the expected share of false
    ones, the usual choice when many labels are screened.
    """
    method = Adjust(method)
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0 or method == Adjust.none:
        return [float(x) for x in (p if method == Adjust.none else out)]
    order = idx[np.argsort(p[idx], kind="mergesort")]
    ps = p[order]
    k = np.arange(1, m + 1)
    if method == Adjust.holm:  # step-down: running maximum of (m - k + 1) p_(k)
        adj = np.maximum.accumulate(np.minimum(1.0, (m - k + 1) * ps))
    else:  # step-up: running minimum from the largest of m p_(k) / k
        adj = np.minimum.accumulate(np.minimum(1.0, m * ps / k)[::-1])[::-1]
    out[order] = adj
    return [float(x) for x in out]


def signed_log2(pct: float) -> float:
    """Volcano x axis: sign(d) * log2(1 + |d|) of a % difference d (0 stays 0, sign kept)."""
    return math.copysign(math.log2(1.0 + abs(pct)), pct)


Key = tuple[str, str, str | None]  # (task, test set, label; None = mean AUROC)


def per_seed(sweep: Sweep, task: str, head: str, split: str, label: str | None) -> dict[int, float]:
    """seed -> AUROC of the finished runs of one task and head (undefined AUROCs left out)."""
    out = {}
    for run in sweep.finished:
        if (run.task, run.head) == (task, head):
            value = run.auroc(split, label)
            if value is not None:
                out[run.seed] = value
    return out


def compare(sweep: Sweep, a: str = "cdl", b: str = "dqc") -> dict[Key, Paired]:
    """Head ``a`` against ``b`` per task, test set, on the mean AUROC and on every label."""
    out: dict[Key, Paired] = {}
    for task in sweep.tasks:
        if not {a, b} <= set(sweep.heads(task)):
            continue
        for split in sweep.test_sets(task):
            for label in [None, *sweep.labels(task)]:
                out[(task, split, label)] = paired(
                    per_seed(sweep, task, a, split, label), per_seed(sweep, task, b, split, label)
                )
    return out
