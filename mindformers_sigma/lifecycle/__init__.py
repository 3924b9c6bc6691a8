"""The RRE model lifecycle after training: inherit experts from a dense model, extract one domain's
sub-model, add a domain.

``inherit``, ``extract`` and ``add_domain`` each turn one checkpoint's model weights
(``checkpoint.model``) into another's, weights-only.
"""
