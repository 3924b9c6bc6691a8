"""Evaluation of a checkpoint: per-domain perplexity (``perplexity``), zero-shot multiple choice and cloze
(``zeroshot``, scored by ``scoring``), tasks made from held-out documents (``make_task``)."""
