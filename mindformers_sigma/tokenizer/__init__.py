"""Tokenizers: the text <-> token id mappings that data, checkpoints and generation share."""
