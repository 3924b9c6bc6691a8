"""mindformers_sigma: a MindSpore reproduction of PanGu-Σ (Random Routed Experts + ECSS)."""

__version__ = "0.1.0"
