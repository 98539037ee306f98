"""Training: explicit state, one jitted step, the epoch loop with early stopping and checkpoints."""
