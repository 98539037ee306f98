"""Evaluation: predictions over a split and per-label AUROC."""
