"""Records of a run: local files (the source of truth) and, optionally, Weights & Biases."""
