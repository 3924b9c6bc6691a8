"""Checkpoints: crash-safe weights + sidecar pairs (``files``), streamed safetensors (``safetensors_file``),
what a checkpoint says about itself (``description``), a checkpoint's model for inference and the
weights-only checkpoints of the lifecycle commands (``model``), and a train step's state restored
from one (``restore``)."""
