"""Command lines of the rank-table tools, shared by `hccl_tools/*.py` and `pangu-sigma rank-table`.

Bad input gets one line on stderr and exit code 2; validate exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

from mindformers_sigma.errors import run_reporting_errors
from mindformers_sigma.one_line_parser import Command, OneLineParser, add_commands
from mindformers_sigma.rank_table.generate import merge_tables, plan_table, read_server_ips, single_server_table
from mindformers_sigma.rank_table.schema import VERSIONS, read_table_file, write_table
from mindformers_sigma.rank_table.validate import validate_table

DEFAULT_HCCN_CONF = "/etc/hccn.conf"


def positive_int(text: str) -> int:
    """argparse type for counts, where 0 or a negative number can only be a slip."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device_num", default="[0,8)", help='half-open range of device ids, e.g. "[0,8)"')
    parser.add_argument("--visible_devices", default="0,1,2,3,4,5,6,7", help='e.g. "0,1,2,3,4,5,6,7"')
    parser.add_argument("--server_ip", help="this server's cluster IP (guessed with a warning if omitted)")
    parser.add_argument("--hccn_conf", help=f"device IPs as address_N=IP lines (default {DEFAULT_HCCN_CONF}; "
                                             f"hccn_tool is asked when that file is absent)")
    parser.add_argument("--output", default=".", help="folder for hccl_{n}p_{ids}_{ip}.json (default: here)")
    parser.add_argument("--version", choices=VERSIONS, default="1.0", help="1.2 for Atlas A3 SuperPoD")
    parser.add_argument("--super_device_ids", help="version 1.2: one super_device_id per device, comma-separated")
    parser.add_argument("--super_pod_id", help="version 1.2: this server's super pod (default 0)")


def run_generate(args: argparse.Namespace) -> int:
    table, name = single_server_table(args.device_num, args.visible_devices, args.server_ip,
                                      args.hccn_conf or DEFAULT_HCCN_CONF, args.hccn_conf is not None,
                                      args.version, args.super_device_ids, args.super_pod_id)
    print(f"wrote {write_table(table, args.output, name)}")
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="per-server rank tables")
    parser.add_argument("--keep-order", action="store_true",
                        help="number ranks in the order the files are given (default: by server IP)")
    parser.add_argument("--output", default=".", help="folder for hccl_{servers}s_{ranks}p.json (default: here)")


def run_merge(args: argparse.Namespace) -> int:
    table, name = merge_tables(args.files, args.keep_order)
    print(f"wrote {write_table(table, args.output, name)}")
    return 0


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rank_table", help="rank table JSON file")
    parser.add_argument("--expect-devices", type=positive_int, help="the number of devices the table must list")


def run_validate(args: argparse.Namespace) -> int:
    problems = validate_table(read_table_file(args.rank_table), args.expect_devices)
    for problem in problems:
        print(f"{args.rank_table}: {problem}")
    if problems:
        return 1
    print(f"{args.rank_table}: valid")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server-ips", help="comma-separated server IPs, in rank order")
    source.add_argument("--server-ips-file", help="file with one server IP per line")
    parser.add_argument("--devices-per-server", type=int, default=8)
    parser.add_argument("--device-ip-scheme", default="192.168.{device}.{server1}",
                        help="device IP template with {server} (0-based), {server1} (1-based), {device}")
    parser.add_argument("--version", choices=VERSIONS, default="1.0")
    parser.add_argument("--output", default=".", help="folder for hccl_{servers}s_{ranks}p.json (default: here)")


def run_plan(args: argparse.Namespace) -> int:
    if args.server_ips_file:
        ips = read_server_ips(args.server_ips_file)
    else:
        ips = [ip.strip() for ip in args.server_ips.split(",") if ip.strip()]
    table, name = plan_table(ips, args.devices_per_server, args.device_ip_scheme, args.version)
    print(f"wrote {write_table(table, args.output, name)}")
    return 0


TOOLS = (
    Command("generate", "one server's rank table (hccl_tools.py)", add_generate_arguments, run_generate),
    Command("merge", "merge per-server tables (merge_hccl.py)", add_merge_arguments, run_merge),
    Command("validate", "check a rank table, one line per problem", add_validate_arguments, run_validate),
    Command("plan", "a whole-cluster table for planning, e.g. 64 x 8 = 512 ranks", add_plan_arguments, run_plan),
)


def _run_chosen_tool(args: argparse.Namespace) -> int:
    return run_reporting_errors(f"pangu-sigma rank-table {args.tool}", lambda: args.run_tool(args))


COMMANDS = (
    Command("rank-table", "HCCL rank tables: generate, merge, validate, plan",
            lambda parser: add_commands(parser, TOOLS, "tool"), _run_chosen_tool),
)


def main_for(tool: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of one tool as a stand-alone script (hccl_tools/*.py)."""
    command = next(command for command in TOOLS if command.name == tool)
    prog = prog or os.path.basename(sys.argv[0])
    parser = OneLineParser(prog=prog, description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(prog, lambda: command.run(args))
