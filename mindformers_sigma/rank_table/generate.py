"""One server's rank table (hccl_tools.py), the multi-server merge, and the planning generator.

Compared with the usual ``hccl_tools.py`` / ``merge_hccl.py``: device ranges with
multi-digit bounds and spaces parse; the server IP is never guessed silently; merges are
ordered by server IP (or kept in argument order on request), never by accident; every value
stays a string; duplicates are refused; and every output is validated and written atomically.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from mindformers_sigma.rank_table.schema import (MAX_DEVICE_ID, Device, RankTableError, Server, build_table,
                                                 parse_ipv4, read_table_file, read_text_file, servers_of)
from mindformers_sigma.rank_table.validate import validate_table

_RANGE = re.compile(r"^\s*\[\s*([0-9]+)\s*,\s*([0-9]+)\s*\)\s*$")
# One hccn.conf setting: KEY_N=VALUE, KEY a word that may hold underscores (send_arp_status_0=1).
_HCCN_SETTING = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)_([0-9]+)\s*=\s*(\S.*)$")
_HCCN_IPV4_KEYS = ("address", "netmask")
_ID_LIST = re.compile(r"^\s*[0-9]+\s*(,\s*[0-9]+\s*)*,?\s*$")


def parse_device_range(text: str, version: str = "1.0") -> List[int]:
    """``"[0,8)"`` or ``"[ 8 , 16 )"`` -> device ids; bounds must lie in 0..max device id + 1."""
    match = _RANGE.match(text)
    if not match:
        raise RankTableError(f"--device_num {text!r}: expected a half-open range like \"[0,8)\"")
    start, end = int(match.group(1)), int(match.group(2))
    limit = MAX_DEVICE_ID[version]
    if start >= end or end > limit + 1:
        raise RankTableError(f"--device_num {text!r}: range outside 0-{limit} (device ids of one server, "
                             f"version {version}); use e.g. \"[0,{limit + 1})\"")
    return list(range(start, end))


def parse_id_list(text: str, flag: str) -> List[int]:
    """``"0,1, 2,3"`` -> [0, 1, 2, 3]; plain digits only, so ``-1`` or ``1_0`` cannot slip through int()."""
    if not _ID_LIST.match(text):
        raise RankTableError(f"{flag} {text!r}: expected comma-separated non-negative integers like \"0,1,2,3\"")
    values = [int(part) for part in text.split(",") if part.strip()]
    if len(set(values)) != len(values):
        raise RankTableError(f"{flag} {text!r}: an id is listed twice; list each once")
    return values


def read_hccn_conf(path: str, version: str = "1.0") -> Dict[int, str]:
    """Device IPs (``address_N``) of an hccn.conf, checked line by line so that a typo cannot drop a device.

    Other than blanks and ``#`` comments every line is ``KEY_N=VALUE`` with N a device id of ``version``;
    address and netmask values must be IPv4 (other keys' values are hccn_tool's business), and no key may
    be given twice for one device.
    """
    text = read_text_file(path, "hccn.conf", "pass --hccn_conf with this server's hccn.conf")
    if not text.strip():
        raise RankTableError(f"{path}: file is empty; it needs address_N=IP lines")
    limit = MAX_DEVICE_ID[version]
    first_line: Dict[Tuple[str, int], int] = {}
    addresses: Dict[int, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        setting = line.strip()
        if not setting or setting.startswith("#"):
            continue
        match = _HCCN_SETTING.match(setting)
        if not match:
            raise RankTableError(f"{path}:{number}: {setting[:60]!r} is not a setting; expected KEY_N=VALUE like "
                                 f"address_0=192.168.100.101")
        key, device, value = match.group(1), int(match.group(2)), match.group(3)
        name = f"{key}_{match.group(2)}"
        if device > limit:
            fix = "remove the line" if version == "1.2" else \
                "remove the line, or use --version 1.2 for a 16-device Atlas A3 server"
            raise RankTableError(f"{path}:{number}: {name}: device {device} outside 0-{limit} for version {version}; "
                                 f"{fix}")
        if key in _HCCN_IPV4_KEYS and parse_ipv4(value) is None:
            raise RankTableError(f"{path}:{number}: {name}={value} is not a valid IPv4 address")
        if (key, device) in first_line:
            raise RankTableError(f"{path}:{number}: {name} given twice (also line {first_line[key, device]}); "
                                 f"keep one")
        first_line[key, device] = number
        if key == "address":
            addresses[device] = value
    return addresses


def device_ips_from_hccn_tool(devices: Sequence[int]) -> Dict[int, str]:
    """Ask ``hccn_tool -i N -ip -g`` for each device (used when no hccn.conf exists)."""
    addresses = {}
    for device in devices:
        result = subprocess.run(["hccn_tool", "-i", str(device), "-ip", "-g"], capture_output=True, text=True)
        match = re.search(r"ipaddr:\s*(\S+)", result.stdout)
        if result.returncode != 0 or not match or parse_ipv4(match.group(1)) is None:
            raise RankTableError(f"hccn_tool -i {device} -ip -g: no IPv4 address in its answer; "
                                 f"write /etc/hccn.conf or pass --hccn_conf")
        addresses[device] = match.group(1)
    return addresses


def device_ips(devices: Sequence[int], hccn_conf: str, conf_given: bool, version: str = "1.0") -> Dict[int, str]:
    """Device IPs from hccn.conf; from hccn_tool only when the default hccn.conf is absent."""
    use_tool = not conf_given and not os.path.exists(hccn_conf) and shutil.which("hccn_tool")
    addresses = device_ips_from_hccn_tool(devices) if use_tool else read_hccn_conf(hccn_conf, version)
    missing = [d for d in devices if d not in addresses]
    if missing:
        raise RankTableError(f"{hccn_conf}: no address_{missing[0]} line (device {missing[0]} is requested); "
                             f"add it or narrow --device_num")
    return {d: addresses[d] for d in devices}


def check_server_ip(text: str, where: str = "--server_ip") -> str:
    """A usable server IP: a unicast IPv4 address that is not loopback, 0.0.0.0 or multicast.

    ``where`` (a flag, or ``PATH:LINE:``) starts the error, so that it points at the input to fix.
    """
    address = parse_ipv4(text)
    if address is None:
        raise RankTableError(f"{where} {text!r}: not an IPv4 address")
    if address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved:
        raise RankTableError(f"{where} {text}: a loopback/unspecified/multicast address cannot identify a "
                             f"server; pass the server's cluster IP")
    return text


def read_server_ips(path: str) -> List[str]:
    """``--server-ips-file``: one IP per line in rank order; blanks and ``#`` comments skipped, the rest checked
    with its line number."""
    first_line: Dict[str, int] = {}
    for number, line in enumerate(read_text_file(path, "server IP list").split("\n"), 1):
        ip = line.strip()
        if not ip or ip.startswith("#"):
            continue
        check_server_ip(ip, f"{path}:{number}:")
        if ip in first_line:
            raise RankTableError(f"{path}:{number}: {ip} already listed on line {first_line[ip]}; "
                                 f"list each server once")
        first_line[ip] = number
    if not first_line:
        raise RankTableError(f"{path}: no server IPs; write one IP per line")
    return list(first_line)


def guess_server_ip(warn: Callable[[str], None]) -> str:
    """The host name's IPv4 address, used only with a warning; loopback answers are refused."""
    try:
        guessed = socket.gethostbyname(socket.gethostname())
    except OSError:
        guessed = ""
    address = parse_ipv4(guessed)
    if address is None or address.is_loopback:
        raise RankTableError("--server_ip: not given and the host name does not resolve to a usable address; "
                             "pass --server_ip with this server's cluster IP")
    warn(f"warning: --server_ip not given; using {guessed} from the host name. Check it: a wrong server IP "
         f"breaks HCCL at launch")
    return guessed


def single_server_table(device_range: str, visible_devices: str, server_ip: Optional[str], hccn_conf: str,
                        conf_given: bool, version: str = "1.0", super_device_ids: Optional[str] = None,
                        super_pod_id: Optional[str] = None,
                        warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Tuple[dict, str]:
    """The table for one server and its conventional file name ``hccl_{n}p_{ids}_{ip}.json``.

    ``super_pod_id`` defaults to "0" under version 1.2; the A3 values are refused under 1.0, where they
    would be dropped without a word.
    """
    devices = parse_device_range(device_range, version)
    visible = parse_id_list(visible_devices, "--visible_devices")
    beyond = [d for d in visible if d > MAX_DEVICE_ID[version]]
    if beyond:
        raise RankTableError(f"--visible_devices {visible_devices!r}: device {beyond[0]} outside "
                             f"0-{MAX_DEVICE_ID[version]} for version {version}")
    hidden = [d for d in devices if d not in visible]
    if hidden:
        raise RankTableError(f"--device_num {device_range}: device {hidden[0]} is not in --visible_devices "
                             f"{visible_devices}")
    if version != "1.2":
        for flag, value in (("--super_device_ids", super_device_ids), ("--super_pod_id", super_pod_id)):
            if value is not None:
                raise RankTableError(f"{flag}: only for --version 1.2 (Atlas A3); drop it or add --version 1.2")
    elif super_pod_id is not None and not re.fullmatch(r"[0-9]+", super_pod_id):
        raise RankTableError(f"--super_pod_id {super_pod_id!r}: expected a non-negative integer like 0")
    server_ip = check_server_ip(server_ip) if server_ip else guess_server_ip(warn)
    addresses = device_ips(devices, hccn_conf, conf_given, version)
    if version == "1.2":
        if super_device_ids is None:
            raise RankTableError("--super_device_ids: required for version 1.2 (Atlas A3): one id per device, "
                                 "from npu-smi info -t spod-info")
        supers = parse_id_list(super_device_ids, "--super_device_ids")
        if len(supers) != len(devices):
            raise RankTableError(f"--super_device_ids: {len(supers)} ids for {len(devices)} devices")
    else:
        supers = [None] * len(devices)
    server = Server(server_ip, [Device(d, addresses[d], None if s is None else str(s)) for d, s in zip(devices, supers)],
                    super_pod_id or "0")
    table = finished(build_table([server], version), "generated table")
    name = f"hccl_{len(devices)}p_{''.join(str(d) for d in devices)}_{server_ip}.json"
    return table, name


def finished(table: dict, what: str) -> dict:
    """Refuse to write a table that does not validate (a bug guard, not a user error path)."""
    problems = validate_table(table)
    if problems:
        raise RankTableError(f"{what}: {problems[0]}")
    return table


def merge_tables(paths: Sequence[str], keep_order: bool = False) -> Tuple[dict, str]:
    """Merge per-server tables; ranks renumbered by server IP (or argument order with keep_order)."""
    servers: List[Server] = []
    version = None
    origin: Dict[str, str] = {}
    device_origin: Dict[str, str] = {}
    for path in paths:
        table = read_table_file(path)
        problems = validate_table(table)
        if problems:
            raise RankTableError(f"{path}: {problems[0]}")
        if version is not None and table["version"] != version:
            raise RankTableError(f"{path}: version {table['version']} differs from {version} of {paths[0]}; "
                                 f"merge tables of one version")
        version = table["version"]
        for server in servers_of(table):
            if server.server_id in origin:
                raise RankTableError(f"{path}: server {server.server_id} is already in {origin[server.server_id]}; "
                                     f"each server may appear once")
            origin[server.server_id] = path
            for device in server.devices:
                if device.device_ip in device_origin:
                    raise RankTableError(f"{path}: device IP {device.device_ip} is already used in "
                                         f"{device_origin[device.device_ip]}; tables overlap")
                device_origin[device.device_ip] = path
            servers.append(server)
    if not servers:
        raise RankTableError("merge: give at least one rank table")
    if not keep_order:
        servers.sort(key=lambda server: ipaddress.IPv4Address(server.server_id))
    table = finished(build_table(servers, version), "merged table")
    ranks = sum(len(s.devices) for s in servers)
    return table, f"hccl_{len(servers)}s_{ranks}p.json"


def expand_device_ip(scheme: str, server: int, device: int) -> str:
    """Fill a device-IP scheme such as ``"192.168.{device}.{server1}"``.

    Fields: ``server`` (0-based index in the server list), ``server1`` (1-based) and ``device``.
    Only these integer fields are substituted; nothing is evaluated.
    """
    values = {"server": server, "server1": server + 1, "device": device}

    def field(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise RankTableError(f"--device-ip-scheme {scheme!r}: unknown field {{{name}}}; "
                                 f"use {{server}}, {{server1}} or {{device}}")
        return str(values[name])

    address = re.sub(r"\{(\w*)\}", field, scheme)
    if parse_ipv4(address) is None:
        raise RankTableError(f"--device-ip-scheme {scheme!r}: gives {address!r} for server {server}, "
                             f"device {device}, which is not an IPv4 address")
    return address


def plan_table(server_ips: Sequence[str], devices_per_server: int = 8,
               device_ip_scheme: str = "192.168.{device}.{server1}", version: str = "1.0") -> Tuple[dict, str]:
    """A whole-cluster table for planning (e.g. 64 servers x 8 devices = 512 ranks), in the given order."""
    if not server_ips:
        raise RankTableError("--server-ips: give at least one server IP")
    if not 1 <= devices_per_server <= MAX_DEVICE_ID[version] + 1:
        raise RankTableError(f"--devices-per-server {devices_per_server}: must be 1-{MAX_DEVICE_ID[version] + 1}")
    servers: List[Server] = []
    listed: Set[str] = set()
    for index, ip in enumerate(server_ips):
        check_server_ip(ip, "--server-ips")
        if ip in listed:
            raise RankTableError(f"--server-ips: {ip} is listed twice; list each server once")
        listed.add(ip)
        devices = [Device(d, expand_device_ip(device_ip_scheme, index, d),
                          str(index * devices_per_server + d) if version == "1.2" else None)
                   for d in range(devices_per_server)]
        servers.append(Server(ip, devices, "0"))
    table = build_table(servers, version)
    problems = validate_table(table)
    if problems:
        raise RankTableError(f"--device-ip-scheme {device_ip_scheme!r}: {problems[0]}")
    return table, f"hccl_{len(servers)}s_{len(servers) * devices_per_server}p.json"
