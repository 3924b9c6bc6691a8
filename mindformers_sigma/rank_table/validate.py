"""Rank-table validation: every problem, one line each, with where it is.

Checked: schema and value types (every value a string), ``server_count`` equal to the
servers listed, ``status`` completed, valid IPv4 server and device addresses, unique device
IPs, device ids within 0-7 (0-15 on version 1.2 / A3), no device id twice on one server,
rank ids contiguous from 0, ``super_device_id`` on every device and a consistent
``super_pod_list`` under version 1.2, and optionally the expected device count.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

from mindformers_sigma.rank_table.schema import MAX_DEVICE_ID, VERSIONS, parse_ipv4

TOP_KEYS = {"1.0": ["version", "server_count", "server_list", "status"],
            "1.2": ["version", "server_count", "server_list", "super_pod_list", "status"]}
POD_KEYS = ("super_pod_id", "server_list")
DEVICE_KEYS = {"1.0": ["device_id", "device_ip", "rank_id"],
               "1.2": ["device_id", "device_ip", "rank_id", "super_device_id"]}


def _is_int_string(value: object) -> bool:
    """ASCII digits without a leading zero ("٣" and "３" are digits to str.isdigit, not to HCCL)."""
    return (isinstance(value, str) and value.isascii() and value.isdigit()
            and (value == "0" or not value.startswith("0")))


def validate_table(table: object, expect_devices: Optional[int] = None) -> List[str]:
    """Problems found, as ``location: problem`` lines; an empty list means the table is valid."""
    if not isinstance(table, dict):
        return [f"<top>: must be a JSON object, got {type(table).__name__}"]
    problems: List[str] = []
    version = table.get("version")
    if version not in VERSIONS:
        problems.append(f"version: {version!r} is not one of {', '.join(repr(v) for v in VERSIONS)} (as a string)")
        version = "1.2" if "super_pod_list" in table else "1.0"
    for key in TOP_KEYS[version]:
        if key not in table:
            problems.append(f"{key}: missing")
    for key in table:
        if key not in TOP_KEYS[version]:
            problems.append(f"{key}: unknown key for version {version}")
    if "status" in table and table["status"] != "completed":
        problems.append(f"status: {table['status']!r}, expected 'completed'")
    servers = table.get("server_list")
    if not isinstance(servers, list) or not servers:
        if "server_list" in table:
            problems.append("server_list: must be a non-empty list of servers")
        return problems
    if "server_count" in table:
        count = table["server_count"]
        if not _is_int_string(count):
            problems.append(f"server_count: {count!r} must be a string of ASCII digits without a leading zero")
        elif int(count) != len(servers):
            problems.append(f"server_count: {count!r} but server_list has {len(servers)} servers")

    device_ip_seen: Dict[str, str] = {}
    server_seen: Dict[str, str] = {}
    ranks: List[int] = []
    total_devices = 0
    for s, server in enumerate(servers):
        where = f"server_list[{s}]"
        if not isinstance(server, dict):
            problems.append(f"{where}: must be an object")
            continue
        _unique_ipv4(server.get("server_id"), f"{where}.server_id", server_seen, problems)
        for key in server:
            if key not in ("server_id", "device", "host_nic_ip", "container_ip"):
                problems.append(f"{where}.{key}: unknown key")
        devices = server.get("device")
        if not isinstance(devices, list) or not devices:
            problems.append(f"{where}.device: must be a non-empty list of devices")
            continue
        device_ids_here: Dict[str, str] = {}
        for d, device in enumerate(devices):
            at = f"{where}.device[{d}]"
            total_devices += 1
            if not isinstance(device, dict):
                problems.append(f"{at}: must be an object")
                continue
            for key in DEVICE_KEYS[version]:
                if key not in device:
                    fix = " (required by version 1.2 / Atlas A3)" if key == "super_device_id" else ""
                    problems.append(f"{at}.{key}: missing{fix}")
            for key in device:
                if key not in DEVICE_KEYS[version]:
                    problems.append(f"{at}.{key}: unknown key for version {version}")
            device_id = device.get("device_id")
            if "device_id" in device:
                if not _is_int_string(device_id):
                    problems.append(f"{at}.device_id: {device_id!r} must be a string of ASCII digits without a leading zero")
                elif int(device_id) > MAX_DEVICE_ID[version]:
                    problems.append(f"{at}.device_id: {device_id} outside 0-{MAX_DEVICE_ID[version]} "
                                    f"for version {version}")
                elif device_id in device_ids_here:
                    problems.append(f"{at}.device_id: {device_id} already used at {device_ids_here[device_id]}")
                else:
                    device_ids_here[device_id] = at
            if "device_ip" in device:
                _unique_ipv4(device["device_ip"], f"{at}.device_ip", device_ip_seen, problems)
            rank_id = device.get("rank_id")
            if "rank_id" in device:
                if not _is_int_string(rank_id):
                    problems.append(f"{at}.rank_id: {rank_id!r} must be a string of ASCII digits without a leading zero")
                else:
                    ranks.append(int(rank_id))
            if version == "1.2" and "super_device_id" in device and not _is_int_string(device["super_device_id"]):
                problems.append(f"{at}.super_device_id: {device['super_device_id']!r} must be a string of ASCII digits without a leading zero")
    if ranks and sorted(ranks) != list(range(len(ranks))):
        duplicates = sorted({r for r in ranks if ranks.count(r) > 1})
        missing = sorted(set(range(len(ranks))) - set(ranks))
        detail = (f"duplicated {duplicates[:5]}" if duplicates else "") + \
                 ("; " if duplicates and missing else "") + (f"missing {missing[:5]}" if missing else "")
        problems.append(f"rank_id: not contiguous from 0 over {len(ranks)} devices ({detail})")
    if version == "1.2" and "super_pod_list" in table:
        problems += _validate_super_pods(table["super_pod_list"], set(server_seen))
    if expect_devices is not None and total_devices != expect_devices:
        problems.append(f"server_list: {total_devices} devices, expected {expect_devices}")
    return problems


def _unique_ipv4(value: object, location: str, seen: Dict[str, str], problems: List[str]) -> None:
    """A valid IPv4 string not used before; ``seen`` maps each address to where it was first used."""
    if not isinstance(value, str) or parse_ipv4(value) is None:
        problems.append(f"{location}: {value!r} is not a valid IPv4 address string")
    elif value in seen:
        problems.append(f"{location}: {value} already used at {seen[value]}")
    else:
        seen[value] = location.rsplit(".", 1)[0]


def _is_object_of(entry: object, where: str, keys, problems: List[str]) -> bool:
    """Whether ``entry`` is a JSON object; appends a problem for it, or for each key not in ``keys``."""
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be an object")
        return False
    problems.extend(f"{where}.{key}: unknown key" for key in entry if key not in keys)
    return True


def _validate_super_pods(pods: object, servers: Set[str]) -> List[str]:
    """Problems of ``super_pod_list``: every pod an object with its own id and a list of listed servers,
    every server in exactly one pod, and no key that HCCL would ignore."""
    if not isinstance(pods, list) or not pods:
        return ["super_pod_list: must be a non-empty list of super pods"]
    problems: List[str] = []
    pod_ids: Dict[str, str] = {}
    placed: Dict[str, str] = {}
    for p, pod in enumerate(pods):
        where = f"super_pod_list[{p}]"
        if not _is_object_of(pod, where, POD_KEYS, problems):
            continue
        pod_id = pod.get("super_pod_id")
        if not _is_int_string(pod_id):
            problems.append(f"{where}.super_pod_id: must be a string of ASCII digits without a leading zero")
        elif pod_id in pod_ids:
            problems.append(f"{where}.super_pod_id: {pod_id} already used at {pod_ids[pod_id]}")
        else:
            pod_ids[pod_id] = where
        members = pod.get("server_list")
        if not isinstance(members, list) or not members:
            problems.append(f"{where}.server_list: must be a non-empty list of servers")
            continue
        for m, member in enumerate(members):
            at = f"{where}.server_list[{m}]"
            if not _is_object_of(member, at, ("server_id",), problems):
                continue
            server_id = member.get("server_id")
            if not isinstance(server_id, str) or server_id not in servers:
                problems.append(f"{at}.server_id: {server_id!r} is not in server_list")
            elif server_id in placed:
                problems.append(f"{at}.server_id: {server_id} already in {placed[server_id]}")
            else:
                placed[server_id] = where
    for server_id in sorted(servers - set(placed)):
        problems.append(f"super_pod_list: server {server_id} belongs to no super pod")
    return problems
