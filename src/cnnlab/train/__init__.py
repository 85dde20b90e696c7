"""Training: the loop, checkpoints, logs and device choice."""
