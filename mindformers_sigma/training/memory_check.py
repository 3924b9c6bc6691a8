"""Refuse, before allocating anything, a CPU run whose training state cannot fit in memory.

A config such as ``vocab_size: 1000000000000`` is valid YAML, and without this check the
trainer tries to allocate terabytes and dies (or swaps the machine to a halt).  The estimate
is a lower bound: fp32 weights, gradients and both AdamW moments (16 bytes per trainable
parameter) plus the logits of one micro-batch, forward and backward (3 x B x S x V x 4 bytes).
With ECSS the experts count as the slab (16 bytes per slab parameter) plus the host store
(12 bytes per expert parameter) where it takes RAM; a memory-mapped store is checked against
the free disk under ``--out`` instead.
Only CPU runs are checked: there the state lives in this machine's memory.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Tuple

from mindformers_sigma.config import SigmaConfig
from mindformers_sigma.ecss.slab import slab_size
from mindformers_sigma.errors import DataError
from mindformers_sigma.params import count_parameters

BYTES_PER_PARAMETER = 16
GIB = 1024 ** 3


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (physical memory where that is missing)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _host_store_bytes(config: SigmaConfig) -> int:
    """ECSS's host store: every expert's fp32 weights and two AdamW moments."""
    return config.model.sparse_layers * config.moe.num_experts * count_parameters(config).one_expert * 12


def store_in_ram(config: SigmaConfig) -> bool:
    """Whether an ECSS store takes RAM: in RAM, or memory-mapped but checkpointed as ckpt (MindSpore
    parses a ckpt file whole); a memory-mapped store with safetensors checkpoints stays on disk."""
    return config.ecss.host_store == "ram" or config.train.checkpoint_format == "ckpt"


def estimate_training_bytes(config: SigmaConfig, micro_batch: int) -> Tuple[int, List[Tuple[int, str]]]:
    """(bytes, [(bytes, what)] largest first) of one process's training state in RAM."""
    m, count = config.model, count_parameters(config)
    embedding = m.vocab_size * m.hidden_size
    experts = m.sparse_layers * config.moe.num_experts * count.one_expert
    parts = [
        (embedding * BYTES_PER_PARAMETER, "model.vocab_size (word embedding and head)"),
        ((count.total - embedding - experts) * BYTES_PER_PARAMETER, "model.hidden_size / model.num_layers (dense weights)"),
        (3 * micro_batch * m.seq_length * m.vocab_size * 4,
         "model.vocab_size x train.batch_size x model.seq_length (logits)"),
    ]
    if not config.ecss.enabled:
        parts.append((experts * BYTES_PER_PARAMETER, "moe.num_experts / model.ffn_hidden_size (expert weights)"))
    else:
        slab = m.sparse_layers * slab_size(config) * count.one_expert
        # slab weights and gradients, and two steps' staged copies (with prefetch)
        parts.append((slab * BYTES_PER_PARAMETER, "ecss.slab_experts (the device slab, its gradients, staged copies)"))
        if store_in_ram(config):
            parts.append((_host_store_bytes(config), "moe.num_experts / model.ffn_hidden_size (the ECSS host store; "
                                                     "ecss.host_store: mmap with train.checkpoint_format: "
                                                     "safetensors keeps it on disk)"))
    parts.sort(reverse=True)
    return sum(size for size, _ in parts), parts


def check_fits_in_memory(config: SigmaConfig, micro_batch: int, local_processes: int) -> None:
    """One-line DataError when ``local_processes`` CPU workers' state exceeds available memory."""
    if config.context.device_target != "CPU":
        return
    needed, parts = estimate_training_bytes(config, micro_batch)
    needed *= local_processes
    available = available_memory_bytes()
    if needed > available:
        largest = parts[0][1]
        raise DataError(f"{config.source}: training needs at least {needed / GIB:,.1f} GiB (weights, gradients, "
                        f"Adam moments, logits{f' x {local_processes} workers' if local_processes > 1 else ''}) "
                        f"but {available / GIB:,.1f} GiB is available; the largest part is {largest}: reduce it")


def check_store_fits_on_disk(config: SigmaConfig, out_dir: str, local_processes: int) -> None:
    """One-line DataError when a memory-mapped ECSS store (one per local rank) cannot fit on the disk of ``out_dir``."""
    if not (config.ecss.enabled and config.ecss.host_store == "mmap"):
        return
    needed = _host_store_bytes(config) * local_processes
    existing = os.path.abspath(out_dir)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        return  # the run folder's own check says that nothing can be written there, and why
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DataError(f"{config.source}: ecss.host_store: mmap needs {_size(needed)} under --out {out_dir} "
                        f"for the expert store but {_size(free)} is free there; free space, choose another "
                        f"--out, or reduce moe.num_experts")


def _size(count: int) -> str:
    return f"{count / GIB:,.1f} GiB" if count >= GIB else f"{count / 2 ** 20:,.1f} MiB"
