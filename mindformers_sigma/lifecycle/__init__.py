"""The RRE model lifecycle after training: load a checkpoint's model, inherit experts from a dense
model, extract one domain's sub-model, add a domain.

``model_checkpoint`` reads and writes the model part of self-describing checkpoints; ``inherit``,
``extract`` and ``add_domain`` each turn one checkpoint into another, weights-only.
"""
