"""Checks made before a single rank starts, so that a mistake costs seconds, not a cluster allocation.

The trainer's arguments are parsed by the trainer's own parser and its config (with every
``--set`` override) is loaded; the config's device count must match what will be launched; a
rank table must pass the full validator and list this server.  Paths on the trainer's command
line become absolute, because every rank works in its own folder.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import yaml

from mindformers_sigma.config import SigmaConfig, load_config, parse_yaml
from mindformers_sigma.errors import DataError, UserError
from mindformers_sigma.launcher.options import absolute
from mindformers_sigma.one_line_parser import RaisingParser
from mindformers_sigma.parallel.runtime import check_trainable
from mindformers_sigma.rank_table.schema import RankTableError, read_table_file
from mindformers_sigma.rank_table.validate import validate_table
from mindformers_sigma.training.command import add_arguments as add_train_arguments, train_config

_PATH_OPTIONS = ("data", "out", "resume")  # `pangu-sigma train` options that name files or folders


@dataclass(frozen=True)
class Server:
    server_id: str
    ranks: Tuple[Tuple[int, int], ...]  # (rank id, device id), by rank


@dataclass(frozen=True)
class RankTableLayout:
    path: str
    servers: Tuple[Server, ...]  # in the table's order

    @property
    def size(self) -> int:
        return sum(len(server.ranks) for server in self.servers)

    def server(self, server_id: Optional[str]) -> Server:
        """This server's entry: the only one, or the one ``--server-id`` names."""
        names = [server.server_id for server in self.servers]
        if server_id is None:
            if len(names) > 1:
                raise DataError(f"{self.path}: lists {len(names)} servers; pass --server-id with this server's IP "
                                f"(one of {', '.join(names)})")
            return self.servers[0]
        for server in self.servers:
            if server.server_id == server_id:
                return server
        raise DataError(f"{self.path}: no server {server_id}; --server-id must be one of {', '.join(names)}")


def read_rank_table(path: str) -> RankTableLayout:
    """A rank table that passes the full validator, as servers and their (rank, device) pairs."""
    try:
        table = read_table_file(path)
    except RankTableError as err:
        raise DataError(str(err)) from None
    problems = validate_table(table)
    if problems:
        raise DataError(f"{path}: {problems[0]} ({len(problems)} problem(s); "
                        f"see `pangu-sigma rank-table validate {path}`)")
    servers = tuple(Server(server["server_id"], tuple(sorted((int(device["rank_id"]), int(device["device_id"]))
                                                             for device in server["device"])))
                    for server in table["server_list"])
    return RankTableLayout(path, servers)


@dataclass(frozen=True)
class TrainCommand:
    """What every rank runs: ``run/train.py`` with these arguments, and the config they describe."""

    config: SigmaConfig
    args: Tuple[str, ...]


def _train_parser() -> RaisingParser:
    parser = RaisingParser(prog="TRAIN_ARGS (for pangu-sigma train)", add_help=False)
    add_train_arguments(parser)
    return parser


def _as_arguments(parser: RaisingParser, namespace) -> List[str]:
    """The parsed options back as a command line, every option the parser knows included."""
    argv: List[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse's documented-in-practice list of options
        value = getattr(namespace, action.dest, None)
        flag = action.option_strings[0] if action.option_strings else None
        if flag is None or value is None or value is False or value == []:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _refuse_conflicts(user_sets: Sequence[str], mode_settings: Mapping[str, object], mode: str) -> None:
    """A TRAIN_ARGS ``--set`` may not change what the launch mode itself sets (e.g. the worker count)."""
    for override in user_sets:
        key, _, text = override.partition("=")
        key = key.strip()
        if key in mode_settings:
            try:
                same = parse_yaml(text) == mode_settings[key]
            except (UserError, ValueError, yaml.YAMLError):
                same = False
            if not same:
                raise UserError(f"TRAIN_ARGS --set {override} conflicts with {mode}, which sets "
                                f"{key}={mode_settings[key]}; drop that --set")


def _check_train_paths(namespace) -> None:
    """What the ranks would only find missing after the cluster has formed."""
    if namespace.resume not in (None, "auto") and not os.path.exists(namespace.resume):
        raise DataError(f"TRAIN_ARGS --resume {namespace.resume}: no such checkpoint (file, or sharded step folder); "
                        f"give one, or auto")
    if namespace.data is not None and not os.path.isdir(namespace.data):
        raise DataError(f"TRAIN_ARGS --data {namespace.data}: no such folder; give a prepare-data output folder")
    if namespace.out is not None and os.path.exists(namespace.out) and not os.path.isdir(namespace.out):
        raise DataError(f"TRAIN_ARGS --out {namespace.out}: not a folder; give a run folder")


def check_train_args(config_path: str, train_args: Sequence[str],
                     mode_settings: Optional[Mapping[str, object]] = None, mode: str = "") -> TrainCommand:
    """Parse the trainer's arguments as it will, load the config they describe, and make paths absolute.
    ``mode_settings`` are config values the launch mode sets (before the user's overrides)."""
    mode_settings = mode_settings or {}
    parser = _train_parser()
    overrides = [item for key, value in mode_settings.items() for item in ("--set", f"{key}={value}")]
    namespace = parser.parse_args(["--config", config_path, *overrides, *train_args])
    _refuse_conflicts(namespace.set[len(mode_settings):], mode_settings, mode)  # the user's, after the mode's
    if absolute(namespace.config) != config_path:
        raise UserError(f"TRAIN_ARGS hold --config {namespace.config}; give the config once, as CONFIG before `--`")
    for name in _PATH_OPTIONS:
        value = getattr(namespace, name)
        if value is not None and not (name == "resume" and value == "auto"):
            setattr(namespace, name, absolute(value))
    _check_train_paths(namespace)
    config = train_config(namespace)
    if config.data.path is not None and not os.path.isabs(config.data.path):
        # Relative to where the launcher was started, as for a single process.
        namespace.set.append(f"data.path={json.dumps(absolute(config.data.path))}")
        config = train_config(namespace)
    return TrainCommand(config, tuple(_as_arguments(parser, namespace)))


def requested_parallel(config_path: str, train_args: Sequence[str], name: str) -> int:
    """``parallel.<name>`` as the config and the TRAIN_ARGS ``--set`` say, before the launch mode's settings
    make the whole config valid (the CPU launch derives data_parallel from model_parallel)."""
    namespace = _train_parser().parse_args(["--config", config_path, *train_args])
    value = getattr(load_config(config_path).parallel, name)
    for override in namespace.set:
        key, _, text = override.partition("=")
        if key.strip() == f"parallel.{name}":
            try:
                value = parse_yaml(text)
            except (UserError, ValueError, yaml.YAMLError):
                value = None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"TRAIN_ARGS --set {override}: parallel.{name} must be an integer >= 1")
    return value


def check_layout(command: TrainCommand, launched: int, what: str) -> None:
    """The config's parallel.device_num must be the number of ranks the launch starts, and its layout one
    that this build trains (a planned-only layout is refused before any rank starts)."""
    expected = command.config.parallel.device_num
    if expected != launched:
        raise DataError(f"{command.config.source}: parallel.device_num = {expected} but {what} {launched}; make them "
                        f"agree (e.g. -- --set parallel.device_num={launched})")
    check_trainable(command.config)


def check_port_free(port: int) -> None:
    """msrun's scheduler will listen on ``port`` here: taken, msrun would fail only seconds later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As a server binds: a port left in TIME_WAIT by the previous launch is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            raise DataError(f"--master-port {port} is in use on this machine (another launch?); stop it or pass "
                            f"another --master-port") from None
