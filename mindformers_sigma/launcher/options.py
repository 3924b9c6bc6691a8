"""The launcher's command line: parsed, then checked flag against flag before any file is read.

Every choice is explicit.  The mode is one of `--cpu`, `--msrun`, `--rank-table FILE` (or msrun
with a rank table); an exported RANK_TABLE_FILE never picks a mode by itself; flags that belong
to another mode are refused instead of ignored; a multi-node msrun launch needs this node's rank
and a master address the other nodes can reach.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from mindformers_sigma.errors import UserError
from mindformers_sigma.one_line_parser import OneLineParser

PROG = "distributed_train.sh"

# Environment set by run/distributed_train.sh: the interpreter it chose for the ranks, and why.
PYTHON_ENV = "PANGU_SIGMA_LAUNCH_PYTHON"
PYTHON_FROM_ENV = "PANGU_SIGMA_LAUNCH_PYTHON_FROM"

DEFAULT_DEVICES = 8
DEFAULT_MASTER_PORT = 8118
# msrun's own default (600 s) is shorter than the graph compilation of a large model on Ascend.
DEFAULT_CLUSTER_TIME_OUT = 3600
DEFAULT_GRACE_SECONDS = 30.0

_MSRUN_ONLY = ("nnodes", "node_rank", "master_addr", "master_port", "cluster_time_out", "bind_core")
_FLAG = {"nnodes": "--nnodes", "node_rank": "--node-rank", "master_addr": "--master-addr",
         "master_port": "--master-port", "cluster_time_out": "--cluster-time-out", "bind_core": "--bind-core",
         "devices": "--devices", "workers": "--workers", "server_id": "--server-id"}


@dataclass(frozen=True)
class Interpreter:
    path: str
    chosen_by: str  # e.g. "PYTHON", "the activated environment /opt/venv", "the repository's .venv"


@dataclass(frozen=True)
class LaunchOptions:
    mode: str  # "cpu", "msrun" or "rank_table"
    config: str  # absolute
    train_args: Tuple[str, ...]  # as the user gave them after `--`
    interpreter: Interpreter
    log_dir: str  # absolute
    grace_seconds: float
    dry_run: bool
    workers: Optional[int] = None  # --cpu
    devices: Optional[int] = None  # per node; None: derive from the rank table (or 8)
    rank_table: Optional[str] = None  # absolute
    server_id: Optional[str] = None
    nnodes: Optional[int] = None
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: int = DEFAULT_MASTER_PORT
    cluster_time_out: int = DEFAULT_CLUSTER_TIME_OUT
    bind_core: bool = False


def absolute(path: str) -> str:
    """``path`` made absolute as the kernel will resolve it: ``lnk/../x`` keeps its ``..`` after the
    symlink (os.path.abspath would collapse it by text and name another file)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _node_rank(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [1024, 65535], got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds in [0, 86400], got {text!r}")
    return value


class _Once(argparse.Action):
    """A value option given twice is a mistake (which one was meant?), not "the last one wins"."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _OnceSwitch(_Once):
    """A switch (no value) that may be given once."""

    def __init__(self, option_strings, dest, default=False, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, True, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, usage="%(prog)s (--cpu --workers N | --msrun | --rank-table FILE) [options] CONFIG [-- TRAIN_ARGS]",
        description="Start PanGu-Σ training on several devices or nodes and supervise the ranks: the first rank "
                    "to fail, or Ctrl-C/SIGTERM, stops them all.  TRAIN_ARGS go to `pangu-sigma train` and are "
                    "checked before anything starts.",
        epilog="exit codes: 0 every rank finished; 2 bad argument or failed check (nothing started); 3 a rank "
               "failed (the others were stopped); 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP; 1 launcher bug. "
               "Walk-throughs: docs/training.md, Launchers.")
    parser.add_argument("config", metavar="CONFIG", help="YAML config")
    modes = parser.add_argument_group("mode (exactly one; --msrun may also take --rank-table)")
    modes.add_argument("--cpu", action=_OnceSwitch, help="data parallel over msrun workers on this machine (mccl)")
    modes.add_argument("--msrun", action=_OnceSwitch, help="Ascend/GPU ranks started by msrun")
    modes.add_argument("--rank-table", action=_Once, metavar="FILE",
                       help="HCCL rank table: one process per NPU of this server (with --msrun: handed to msrun)")
    cpu = parser.add_argument_group("--cpu")
    cpu.add_argument("--workers", action=_Once, type=_count, help="number of CPU workers")
    ascend = parser.add_argument_group("--msrun and --rank-table")
    ascend.add_argument("--devices", action=_Once, type=_count,
                        help=f"devices on this node (default: the rank table's, else {DEFAULT_DEVICES})")
    ascend.add_argument("--server-id", action=_Once, metavar="IP",
                        help="this server in a rank table of several servers")
    msrun = parser.add_argument_group("--msrun (nodes come from the rank table when one is given)")
    msrun.add_argument("--nnodes", action=_Once, type=_count, help="number of nodes (default 1)")
    msrun.add_argument("--node-rank", "--node_rank", action=_Once, dest="node_rank", type=_node_rank,
                       help="this node's index, 0..nnodes-1 (required with --nnodes > 1)")
    msrun.add_argument("--master-addr", "--master_addr", action=_Once, dest="master_addr", metavar="ADDR",
                       help="address of node 0, reachable from every node (required with --nnodes > 1)")
    msrun.add_argument("--master-port", "--master_port", action=_Once, dest="master_port", type=_port,
                       help=f"port of msrun's scheduler on node 0 (default {DEFAULT_MASTER_PORT})")
    msrun.add_argument("--cluster-time-out", "--cluster_time_out", action=_Once, dest="cluster_time_out",
                       type=_count,
                       help=f"seconds msrun waits for every rank to join (default {DEFAULT_CLUSTER_TIME_OUT})")
    msrun.add_argument("--bind-core", "--bind_core", dest="bind_core", action=_OnceSwitch,
                       help="let msrun bind each rank to the CPU cores near its device")
    general = parser.add_argument_group("all modes")
    general.add_argument("--log-dir", action=_Once, default=os.path.join("output", "logs"),
                         help="logs and one working folder per rank (default output/logs)")
    general.add_argument("--grace-period", action=_Once, dest="grace_seconds", type=_seconds,
                         default=DEFAULT_GRACE_SECONDS,
                         metavar="SECONDS", help=f"after SIGTERM to the ranks, wait this long before SIGKILL "
                                                 f"(default {DEFAULT_GRACE_SECONDS:g})")
    general.add_argument("--dry-run", action=_OnceSwitch, help="print what would run, start nothing")
    return parser


def choose_interpreter(environ: Mapping[str, str]) -> Interpreter:
    """The interpreter run/distributed_train.sh chose for the ranks (this one when run directly)."""
    path = environ.get(PYTHON_ENV)
    if path:
        return Interpreter(path, environ.get(PYTHON_FROM_ENV) or "PYTHON")
    return Interpreter(sys.executable, "the interpreter running the launcher")


def _refuse_foreign_flags(args: argparse.Namespace, mode: str, names: Sequence[str], why: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value not in (None, False):
            raise UserError(f"{_FLAG[name]} does not apply to {mode}: {why}")


def check_master_addr(address: str, what: str = "--master-addr") -> None:
    """A multi-node master must be an address the other nodes can reach: never a loopback one."""
    bare = address.strip("[]")
    try:
        resolved = ipaddress.ip_address(bare)
    except ValueError:
        try:
            resolved = ipaddress.ip_address(socket.getaddrinfo(bare, None)[0][4][0].split("%")[0])
        except (socket.gaierror, UnicodeError, ValueError, IndexError):
            raise UserError(f"{what} {address}: cannot be resolved here; give node 0's IP address") from None
    mapped = getattr(resolved, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    if resolved.is_loopback or resolved.is_unspecified or (mapped is not None and (mapped.is_loopback or
                                                                                   mapped.is_unspecified)):
        raise UserError(f"{what} {address} is {resolved}, which other nodes cannot reach; give node 0's "
                        f"cluster IP address")


def _mode(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    exported = environ.get("RANK_TABLE_FILE")
    if exported and not args.rank_table:
        raise UserError(f"RANK_TABLE_FILE={exported} is exported but --rank-table is not given: pass "
                        f"--rank-table {exported} to launch with it, or unset RANK_TABLE_FILE")
    if exported and os.path.realpath(exported) != os.path.realpath(args.rank_table):
        raise UserError(f"--rank-table {args.rank_table} conflicts with the exported RANK_TABLE_FILE={exported}; "
                        f"unset RANK_TABLE_FILE or pass the same file")
    if args.cpu and (args.msrun or args.rank_table):
        raise UserError(f"--cpu cannot be combined with {'--msrun' if args.msrun else '--rank-table'}; choose one mode")
    if args.cpu:
        return "cpu"
    if args.msrun:
        return "msrun"
    if args.rank_table:
        return "rank_table"
    raise UserError("no mode given: choose --cpu --workers N, --msrun or --rank-table FILE (see --help)")


def _check_nodes(args: argparse.Namespace) -> None:
    """Plain msrun (no rank table): the node layout comes from the flags alone."""
    nnodes = args.nnodes or 1
    if nnodes == 1:
        if args.node_rank not in (None, 0):
            raise UserError(f"--node-rank {args.node_rank} needs --nnodes greater than {args.node_rank} "
                            f"(one node is node 0)")
        return
    if args.node_rank is None:
        raise UserError(f"--nnodes {nnodes} needs --node-rank (0..{nnodes - 1}) on every node: without it two nodes "
                        f"can both claim ranks 0-{(args.devices or DEFAULT_DEVICES) - 1}")
    if args.node_rank >= nnodes:
        raise UserError(f"--node-rank {args.node_rank} is not below --nnodes {nnodes}; nodes are numbered "
                        f"0..{nnodes - 1}")
    if not args.master_addr:
        raise UserError(f"--nnodes {nnodes} needs --master-addr, the IP address of node 0, the same on every node")
    check_master_addr(args.master_addr)


def _check_input_file(what: str, path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: not a regular file; give the file itself")


def _check_log_dir(path: str) -> None:
    """The log folder must exist as a writable folder or be creatable: found now, not after the checks."""
    existing = absolute(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == absolute(path) else f"is inside {existing}, which is a file"
        raise UserError(f"--log-dir {path} {what}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--log-dir {path}: {existing} is not writable; give a folder you can write to")


def parse_options(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> LaunchOptions:
    """Parse and cross-check the launcher's arguments; everything after ``--`` is for `pangu-sigma train`."""
    argv = list(argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    mode = _mode(args, environ)
    if mode == "cpu":
        if args.workers is None:
            raise UserError("--cpu needs --workers N")
        _refuse_foreign_flags(args, "--cpu", ("devices", "server_id", "nnodes", "node_rank", "master_addr"),
                              "CPU workers run on this machine, on 127.0.0.1 (count them with --workers)")
    else:
        _refuse_foreign_flags(args, "Ascend modes", ("workers",), "the rank count comes from --devices or the table")
    if mode == "rank_table":
        _refuse_foreign_flags(args, "a rank-table launch", _MSRUN_ONLY,
                              "the rank table lists the nodes; start the script on each server with --server-id "
                              "(or use --msrun --rank-table)")
    if args.server_id and not args.rank_table:
        raise UserError("--server-id needs --rank-table: it picks this server among the table's servers")
    if mode == "msrun" and not args.rank_table:
        _check_nodes(args)
    elif args.master_addr:
        check_master_addr(args.master_addr)
    _check_log_dir(args.log_dir)
    _check_input_file("config", args.config)
    if args.rank_table:
        _check_input_file("rank table", args.rank_table)
    return LaunchOptions(
        mode=mode, config=absolute(args.config), train_args=tuple(train_args),
        interpreter=choose_interpreter(environ), log_dir=absolute(args.log_dir),
        grace_seconds=args.grace_seconds, dry_run=args.dry_run, workers=args.workers, devices=args.devices,
        rank_table=absolute(args.rank_table) if args.rank_table else None, server_id=args.server_id,
        nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
        master_port=args.master_port or DEFAULT_MASTER_PORT,
        cluster_time_out=args.cluster_time_out or DEFAULT_CLUSTER_TIME_OUT, bind_core=args.bind_core)
