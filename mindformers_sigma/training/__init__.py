"""Optimizer set-up, the compiled train step, and the training loop."""
