"""Sweep-level bookkeeping (Hydra callbacks): what happened to each job of a multirun."""
