"""The PanGu-Σ decoder: embeddings, attention, FFN, blocks, and the full causal LM."""
