"""Checks that `run/distributed_train.sh` makes before it starts a single worker.

The config's device count must match what will be launched (a rank table's devices, or the
msrun worker count), and on a rank-table launch each local device needs its RANK_ID and
DEVICE_ID, which come from this server's entry in the table.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence

from mindformers_sigma.config import SigmaConfig, apply_overrides, load_config
from mindformers_sigma.data.prepare import DataError


def _rank_table_devices(path: str) -> List[dict]:
    """``[{server_id, device_id, rank_id}]`` from an HCCL rank table (version 1.0 or 1.2)."""
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
        devices = [dict(device, server_id=server["server_id"])
                   for server in table["server_list"] for device in server["device"]]
        for device in devices:
            int(device["rank_id"]), int(device["device_id"])
    except OSError as err:
        raise DataError(f"{path}: cannot read rank table ({err.strerror})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid HCCL rank table ({type(err).__name__}: {err}); "
                        f"generate one with hccl_tools") from None
    return devices


def check_launch(config_path: str, overrides: Sequence[str] = (), workers: Optional[int] = None,
                 rank_table: Optional[str] = None, server_id: Optional[str] = None) -> List[str]:
    """Validate a planned launch; returns ``"RANK_ID DEVICE_ID"`` lines for a rank-table launch."""
    config: SigmaConfig = load_config(config_path)
    config = apply_overrides(config, overrides)
    expected = config.parallel.device_num
    if rank_table is None:
        if workers is not None and workers != expected:
            raise DataError(f"{config_path}: parallel.device_num = {expected} but {workers} workers would start; "
                            f"make them agree")
        return []
    devices = _rank_table_devices(rank_table)
    if len(devices) != expected:
        raise DataError(f"{rank_table}: has {len(devices)} devices but {config_path} says parallel.device_num = "
                        f"{expected}; use a matching rank table or config")
    servers = sorted({d["server_id"] for d in devices})
    if server_id is None:
        if len(servers) > 1:
            raise DataError(f"{rank_table}: lists {len(servers)} servers; pass --server-id with this server's IP "
                            f"(one of {', '.join(servers)})")
        server_id = servers[0]
    local = sorted((int(d["rank_id"]), int(d["device_id"])) for d in devices if d["server_id"] == server_id)
    if not local:
        raise DataError(f"{rank_table}: no server {server_id}; servers are {', '.join(servers)}")
    return [f"{rank} {device}" for rank, device in local]
