"""Interchange with the official MindSpore PanGu-α releases: import their checkpoints, export back."""
