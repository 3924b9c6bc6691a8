"""The constants the planner assumes, each with where it comes from (reported in ``assumptions``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

GIB = 1024 ** 3


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    source: str


def ascend_910_cluster(hbm_gb: float, host_gb: float) -> Dict[str, Assumption]:
    """Ascend 910 in Atlas 800 training servers (8 cards each); ``--hbm-gb`` and ``--host-gb`` override memory."""
    return {
        "hbm_bytes_per_device": Assumption(hbm_gb * GIB, "bytes", "--hbm-gb (Ascend 910: 32 GB HBM2, vendor spec)"),
        "host_bytes_per_server": Assumption(host_gb * GIB, "bytes",
                                            "--host-gb (default 512 GiB: the paper's 'over 32 TB' of cluster "
                                            "memory over 64 servers; a reading, not a published figure)"),
        "devices_per_server": Assumption(8, "devices", "Atlas 800 training server: 8 Ascend 910 (vendor spec)"),
        "peak_flops": Assumption(256e12, "FLOP/s", "Ascend 910 fp16 dense peak, 256 TFLOPS (vendor spec)"),
        "compute_efficiency": Assumption(0.45, "fraction of peak",
                                         "choice: the matmul-bound share of a 5120-wide fp16 transformer layer "
                                         "that MindSpore reaches on Ascend 910 (not measured here)"),
        "intra_server_bandwidth": Assumption(30e9, "bytes/s per device",
                                             "HCCS, one 30 GB/s link per peer (vendor spec: 3 x 30 GB/s); a ring "
                                             "collective inside a server runs at one link's rate"),
        "inter_server_bandwidth": Assumption(100e9 / 8 * 0.8, "bytes/s per device",
                                             "the card's 100 Gb/s RoCE port (vendor spec) at 80% efficiency (choice)"),
        "host_device_bandwidth": Assumption(25e9, "bytes/s per device",
                                            "PCIe 4.0 x16, 32 GB/s nominal, ~25 GB/s achieved (choice)"),
        "host_memory_bandwidth": Assumption(100e9, "bytes/s per server",
                                            "choice: about half the ~200 GB/s peak of a 2-socket DDR4 server, "
                                            "what a streaming numpy AdamW reaches"),
        "workspace_bytes": Assumption(2 * GIB, "bytes per device",
                                      "choice: MindSpore's runtime, communication buffers and kernel workspace"),
        "communication_overlap": Assumption(0.0, "fraction",
                                            "choice: no collective overlaps compute (a conservative bound), except "
                                            "ECSS's host transfers, which prefetch overlaps with the step"),
        "paper_tokens_per_s": Assumption(69905, "tokens/s", "PanGu-Σ paper: measured on 512 Ascend 910"),
    }
