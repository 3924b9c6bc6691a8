"""HCCL rank-table structure: building tables in the exact key order, reading and writing them.

Version 1.0 (Atlas 800 / Ascend 910):

    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}],
                      "host_nic_ip": "reserve"}],
     "status": "completed"}

Version 1.2 (Atlas A3 SuperPoD) adds ``super_device_id`` to every device (after ``rank_id``)
and a top-level ``super_pod_list`` of ``{"super_pod_id", "server_list": [{"server_id"}]}``
before ``status``.  Every value is a string.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from mindformers_sigma.atomic import write_bytes_atomic
from mindformers_sigma.errors import UserError

VERSIONS = ("1.0", "1.2")
MAX_DEVICE_ID = {"1.0": 7, "1.2": 15}


class RankTableError(UserError):
    """Bad rank-table input; the message is one line naming the input, the problem and the fix."""


@dataclass(frozen=True)
class Device:
    device_id: int
    device_ip: str
    super_device_id: Optional[str] = None


@dataclass(frozen=True)
class Server:
    server_id: str
    devices: Sequence[Device]
    super_pod_id: Optional[str] = None


def parse_ipv4(text: str) -> Optional[ipaddress.IPv4Address]:
    """The address, or None when ``text`` is not a dotted-quad IPv4 address."""
    try:
        return ipaddress.IPv4Address(text)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return None


def build_table(servers: Sequence[Server], version: str) -> dict:
    """A rank table with ranks numbered in the given server order, then device order."""
    rank = 0
    server_list = []
    for server in servers:
        devices = []
        for device in server.devices:
            entry = {"device_id": str(device.device_id), "device_ip": device.device_ip, "rank_id": str(rank)}
            if version == "1.2":
                entry["super_device_id"] = str(device.super_device_id)
            devices.append(entry)
            rank += 1
        server_list.append({"server_id": server.server_id, "device": devices, "host_nic_ip": "reserve"})
    table: Dict[str, object] = {"version": version, "server_count": str(len(servers)), "server_list": server_list}
    if version == "1.2":
        pods: Dict[str, List[dict]] = {}
        for server in servers:
            pods.setdefault(str(server.super_pod_id), []).append({"server_id": server.server_id})
        table["super_pod_list"] = [{"super_pod_id": pod, "server_list": members} for pod, members in pods.items()]
    table["status"] = "completed"
    return table


def servers_of(table: dict) -> List[Server]:
    """The servers of an already-validated table (rank ids are recomputed by build_table)."""
    pod_of = {member["server_id"]: pod["super_pod_id"]
              for pod in table.get("super_pod_list", []) for member in pod["server_list"]}
    return [Server(entry["server_id"],
                   [Device(int(d["device_id"]), d["device_ip"], d.get("super_device_id")) for d in entry["device"]],
                   pod_of.get(entry["server_id"]))
            for entry in table["server_list"]]


def read_text_file(path: str, what: str, fix: str = "check the path") -> str:
    """The UTF-8 text of an input file (a byte-order mark dropped); unreadable or binary input is one line."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise RankTableError(f"{path}: cannot read {what} ({err.strerror}); {fix}") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise RankTableError(f"{path}: not UTF-8 (byte {err.start}); {what} is a text file") from None


def read_table_file(path: str) -> object:
    """Parsed JSON of a rank-table file; unreadable, empty, non-UTF-8 or non-JSON input is an error, and so
    is a key given twice in one object, which JSON readers would otherwise settle silently by the last one."""
    text = read_text_file(path, "rank table")
    if not text.strip():
        raise RankTableError(f"{path}: file is empty; generate it with hccl_tools.py")

    def object_without_repeated_keys(pairs: List[Tuple[str, object]]) -> dict:
        keys: Set[str] = set()
        for key, _ in pairs:
            if key in keys:
                raise RankTableError(f"{path}: key {key!r} appears twice in one object; keep one")
            keys.add(key)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=object_without_repeated_keys)
    except json.JSONDecodeError as err:
        raise RankTableError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except RecursionError:
        raise RankTableError(f"{path}: nested too deeply for a rank table; check that it is the right file") from None


def write_table(table: dict, directory: str, file_name: str) -> str:
    """Write ``table`` atomically as ``directory/file_name`` (4-space JSON, key order kept).

    A folder that cannot take the file is the user's to fix, so its OSError becomes one line.
    """
    path = os.path.join(directory, file_name)
    try:
        os.makedirs(directory, exist_ok=True)
        write_bytes_atomic(path, (json.dumps(table, indent=4) + "\n").encode("utf-8"))
    except OSError as err:
        raise RankTableError(f"--output {directory}: cannot write there ({_unwritable_reason(directory, path, err)}); "
                             f"pass a writable folder") from None
    return path


def _unwritable_reason(directory: str, path: str, err: OSError) -> str:
    """Name the culprit (a file where a folder should be, a folder where the table should be) over errno text."""
    if os.path.isdir(path):
        return f"{path} is a folder"
    existing = directory
    while existing and not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if existing and os.path.exists(existing) and not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    return err.strerror or str(err)
