"""qtl's Hydra launcher plugins (found by Hydra's plugin scan of the ``hydra_plugins`` namespace).

``hydra/launcher=gpu_pool``: run a sweep's jobs as subprocesses on one machine, at most one
job per GPU (or N CPU-only jobs with the cores divided between them).
"""
