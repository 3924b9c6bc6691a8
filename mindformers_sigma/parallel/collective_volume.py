"""The bytes each rank hands to each collective in one training step, from the config alone.

This is what the code in ``distributed/`` sends: every collective is an AllReduce (a ring sends
``2 (n - 1) / n`` times its buffer over the wire), a gather its summed zero buffer.  Counted per
process-group kind, as ``pangu-sigma bench parallel`` measures them:

* ``model`` (``mp`` ranks of a data shard): the row-parallel layers' partial sums (forward), the
  column-parallel layers' input gradients (backward), the vocabulary-parallel embedding and
  cross-entropy, and the experts' partial sums;
* ``expert`` (``ep`` ranks of a block): every token of the block to the experts' owners and their
  outputs back, and the outputs' gradients;
* ``expert_model`` (the block's ``ep x mp`` ranks): the tokens' gradients back to their ranks;
* ``data`` / ``expert_data``: each micro-batch's gradients of the dense / expert slices, the loss
  statistics, and with the optimizer shard the updated rows gathered;
* ``world``: the global gradient norm and the stop vote.

Decoder layers' forward collectives run again in the backward pass with ``parallel.recompute``.
An expert's rows are counted as the tokens routed to it (the RRE plan pads each slot to a multiple
of 8 rows, which the measurement includes and this count does not).
"""

from __future__ import annotations

from typing import Dict

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.distributed.topology import Topology, optimizer_shards
from mindformers_sigma.model import names
from mindformers_sigma.parallel.layouts import parameter_layouts

KINDS = ("model", "expert", "expert_model", "data", "expert_data", "world")
FLOAT32 = 4


def collective_buffers(config: SigmaConfig) -> Dict[str, int]:
    """Bytes per step one rank passes to the collectives of each group kind (0 where the group is one rank)."""
    m, p, train = config.model, config.parallel, config.train
    dp, mp, ep = p.data_parallel, p.model_parallel, p.expert_parallel
    micro = train.grad_accumulation_steps
    tokens = train.batch_size // (dp * micro) * m.seq_length
    act = 2 if m.compute_dtype == "float16" else 4
    hidden = tokens * m.hidden_size * act
    passes = 2 if p.recompute else 1  # a layer's forward collectives, again when recomputed
    found = dict.fromkeys(KINDS, 0)
    if mp > 1:
        per_micro = m.num_layers * (hidden + passes * hidden) + hidden  # attention; the top query's own input
        per_micro += m.dense_layers * (hidden + passes * hidden)  # dense FFN
        per_micro += m.sparse_layers * passes * hidden  # the experts' partial sums
        if p.vocab_parallel:
            per_micro += tokens * m.hidden_size * FLOAT32 + hidden  # embedding rows; the head's input gradient
            per_micro += (mp + 2) * tokens * FLOAT32  # the gathered row maxima, sums of exponentials, targets
        found["model"] = micro * per_micro
    block = ep * hidden
    if ep > 1:
        found["expert"] = micro * m.sparse_layers * (2 * passes * block + block)
    if ep > 1 or mp > 1:
        found["expert_model"] = micro * m.sparse_layers * block
    topology = Topology(dp, mp, ep)
    gradients = {"data": 0, "expert_data": 0}
    gathers = {"data": 0, "expert_data": 0}
    for layout in parameter_layouts(config):
        if not layout.trainable or layout.kind == "optimizer" or layout.kind == "state":
            continue
        expert = names.is_expert_parameter(layout.name)
        kind = "expert_data" if expert else "data"
        local = [size // split for size, split in zip(layout.shape, layout.splits)]
        size = FLOAT32
        for dim in local:
            size *= dim
        gradients[kind] += size
        whole_over_model = "model" not in names.split_axes(layout.name, len(local), p.vocab_parallel)
        if p.optimizer_shard and layout.kind != "slab" and local and \
                optimizer_shards(topology, expert, local[0], whole_over_model) > 1:
            gathers[kind] += size
    if dp > 1:
        statistics = (2 * config.moe.num_domains + 2) * FLOAT32  # NLL and tokens per domain, aux loss, drops
        found["data"] = micro * (gradients["data"] + statistics) + gathers["data"]
    if dp // ep > 1:
        found["expert_data"] = micro * gradients["expert_data"] + gathers["expert_data"]
    if dp * mp > 1:
        found["world"] = 2 * FLOAT32
    return found
