"""Training data: sources, batches with domain ids."""
