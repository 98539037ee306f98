"""qtl's Optuna sweeper (``hydra/sweeper=qtl_optuna``): an Optuna >= 4 search that resumes.

It takes the search-space syntax of Hydra's Optuna sweeper, whose release (1.3.0) needs
Optuna < 3 and, on a stored study, restarts its job numbers at 0 and runs ``n_trials`` more.
This one treats ``n_trials`` as the study's total, continues the
job numbers (job number = Optuna trial number, so each trial has its own run directory),
and reruns a trial that was running when the search was killed in its own directory, where
qtl resumes it from its last checkpoint. See ``optuna_sweeper.py`` for the config.
"""
