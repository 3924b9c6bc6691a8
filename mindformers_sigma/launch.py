"""Checks that `run/distributed_train.sh` makes before it starts a single worker.

The config's device count must match what will be launched (a rank table's devices, or the
msrun worker count), the rank table must pass the full validator, and on a rank-table launch
each local device needs its RANK_ID and DEVICE_ID, which come from this server's entry.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from mindformers_sigma.config import SigmaConfig, apply_overrides, load_config
from mindformers_sigma.errors import DataError
from mindformers_sigma.rank_table.schema import RankTableError, read_table_file
from mindformers_sigma.rank_table.validate import validate_table


def _rank_table_devices(path: str, expect_devices: int, config_path: str) -> List[dict]:
    """``[{server_id, device_id, rank_id}]`` of a rank table that passes the full validator."""
    try:
        table = read_table_file(path)
    except RankTableError as err:
        raise DataError(str(err)) from None
    problems = validate_table(table)
    if problems:
        raise DataError(f"{path}: {problems[0]} ({len(problems)} problem(s); "
                        f"see `pangu-sigma rank-table validate {path}`)")
    devices = [dict(device, server_id=server["server_id"])
               for server in table["server_list"] for device in server["device"]]
    if len(devices) != expect_devices:
        raise DataError(f"{path}: has {len(devices)} devices but {config_path} says parallel.device_num = "
                        f"{expect_devices}; use a matching rank table or config")
    return devices


def check_launch(config_path: str, overrides: Sequence[str] = (), workers: Optional[int] = None,
                 rank_table: Optional[str] = None, server_id: Optional[str] = None) -> List[str]:
    """Validate a planned launch; returns ``"RANK_ID DEVICE_ID RANK_SIZE"`` lines for a rank-table launch."""
    config: SigmaConfig = load_config(config_path)
    config = apply_overrides(config, overrides)
    expected = config.parallel.device_num
    if rank_table is None:
        if workers is not None and workers != expected:
            raise DataError(f"{config_path}: parallel.device_num = {expected} but {workers} workers would start; "
                            f"make them agree")
        return []
    devices = _rank_table_devices(rank_table, expected, config_path)
    servers = sorted({d["server_id"] for d in devices})
    if server_id is None:
        if len(servers) > 1:
            raise DataError(f"{rank_table}: lists {len(servers)} servers; pass --server-id with this server's IP "
                            f"(one of {', '.join(servers)})")
        server_id = servers[0]
    local = sorted((int(d["rank_id"]), int(d["device_id"])) for d in devices if d["server_id"] == server_id)
    if not local:
        raise DataError(f"{rank_table}: no server {server_id}; servers are {', '.join(servers)}")
    return [f"{rank} {device} {len(devices)}" for rank, device in local]
