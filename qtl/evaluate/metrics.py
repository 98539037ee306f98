"""Per-label AUROC that tolerates the long tail (a one-class label is undefined, not an error)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def per_label_auroc(
    labels: np.ndarray, probs: np.ndarray, names: Sequence[str]
) -> dict[str, float | None]:
    """AUROC per label column; ``None`` where the split has only positives or only negatives."""
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        y = labels[:, j]
        if y.min() == y.max():
            out[name] = None
        else:
            out[name] = float(roc_auc_score(y, probs[:, j]))
    return out


def mean_auroc(aurocs: dict[str, float | None]) -> float | None:
    """Mean over the labels whose AUROC is defined."""
    defined = [v for v in aurocs.values() if v is not None]
    return float(np.mean(defined)) if defined else None
