"""What a launch will start, decided once: the processes, their environments, their logs.

The same plan is printed by ``--dry-run`` (as a shell script that does the same thing) and run by
the supervisor, so what the dry run shows is what runs.  Counts a rank table already states (its
servers, this server's devices, the node rank) are taken from it; a flag that disagrees is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

from mindformers_sigma.distributed.topology import Topology
from mindformers_sigma.errors import UserError, one_line
from mindformers_sigma.launcher.checks import (RankTableLayout, Server, TrainCommand, check_layout,
                                               check_train_args, read_rank_table, requested_parallel)
from mindformers_sigma.launcher.options import DEFAULT_DEVICES, PROG, LaunchOptions, check_master_addr
from mindformers_sigma.launcher.worker import RANK_FOLDERS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO, "run", "train.py")
MSRUN_LOG = "msrun.log"  # msrun's own output (the ranks' go to their own logs)
HCCL_TIMEOUT_DEFAULT = "1200"  # seconds; HCCL's own defaults are too short for a large model's first step


def rank_log(log_dir: str, rank: int, uses_msrun: bool) -> str:
    """Where rank ``rank`` writes: msrun names its logs ``worker_N.log``, we name ours ``rank_N.log``."""
    return os.path.join(log_dir, f"worker_{rank}.log" if uses_msrun else f"rank_{rank}.log")


@dataclass(frozen=True)
class Process:
    argv: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...]  # added to the launcher's environment
    log: str
    rank: Optional[int] = None  # None: msrun, which starts the ranks itself
    path_prefix: Optional[str] = None  # put first on PATH (msrun starts ranks with the `python` found there)

    def environment(self, base: Mapping[str, str]) -> Dict[str, str]:
        env = dict(base)
        env.update(self.env)
        if self.path_prefix:
            env["PATH"] = self.path_prefix + os.pathsep + base.get("PATH", "")
        return env

    def shell(self) -> str:
        """This process as one line of a shell script."""
        words = ["env"]
        if self.path_prefix:
            words.append(f'PATH={shlex.quote(self.path_prefix)}:"$PATH"')
        words += [shlex.quote(f"{key}={value}") for key, value in self.env]
        words += [shlex.quote(arg) for arg in self.argv]
        words += [">", shlex.quote(self.log), "2>&1"]
        return " ".join(words) + (" &" if self.rank is not None else "")


@dataclass(frozen=True)
class LaunchPlan:
    summary: str  # the first line the launcher prints: mode, layout, interpreter, logs
    processes: Tuple[Process, ...]
    uses_msrun: bool
    local_ranks: Tuple[int, ...]
    log_dir: str
    scheduler_port: Optional[int] = None  # msrun's scheduler listens here on this node
    coordinates: Tuple[str, ...] = ()  # each local rank's place in the data x model x expert mesh

    def rank_log(self, rank: int) -> str:
        return rank_log(self.log_dir, rank, self.uses_msrun)

    @property
    def msrun_log(self) -> str:
        return os.path.join(self.log_dir, MSRUN_LOG)

    @property
    def scheduler_log(self) -> str:
        return os.path.join(self.log_dir, "scheduler.log")  # msrun's name for it

    def script(self) -> str:
        """The dry run: a shell script doing what the launcher would start (without its supervision)."""
        lines = [f"# {self.summary}", *(f"# {line}" for line in self.coordinates), f"mkdir -p {shlex.quote(self.log_dir)}"]
        lines += [process.shell() for process in self.processes]
        if not self.uses_msrun:
            lines.append("wait")
        return "\n".join(lines) + "\n"


def _span(values: Sequence[int]) -> str:
    values = sorted(values)
    if values == list(range(values[0], values[-1] + 1)):
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _coordinates(command: TrainCommand, ranks: Sequence[int]) -> Tuple[str, ...]:
    """Where each of ``ranks`` sits in the config's mesh (``distributed/topology.py``)."""
    p = command.config.parallel
    return tuple(Topology(p.data_parallel, p.model_parallel, p.expert_parallel, rank).describe(
        command.config.moe.num_experts) for rank in ranks)


def _interpreter_note(options: LaunchOptions) -> str:
    return f"python {options.interpreter.path} (chosen by {options.interpreter.chosen_by}); logs in {options.log_dir}"


def _rank_env(options: LaunchOptions) -> Tuple[Tuple[str, str], ...]:
    return ((RANK_FOLDERS_ENV, options.log_dir), ("PYTHONUNBUFFERED", "1"))


def _hccl_env(environ: Mapping[str, str]) -> Tuple[Tuple[str, str], ...]:
    return tuple((name, environ.get(name, HCCL_TIMEOUT_DEFAULT))
                 for name in ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT"))


def _msrun_executable(options: LaunchOptions, environ: Mapping[str, str]) -> Tuple[str, str]:
    """msrun, and the folder to put first on PATH so that the `python` msrun starts is the chosen one."""
    interpreter = options.interpreter.path
    folder = os.path.dirname(os.path.abspath(interpreter))
    candidate = os.path.join(folder, "python")
    if not (os.path.exists(candidate) and os.path.samefile(candidate, interpreter)):
        raise UserError(f"msrun starts each rank with the `python` on PATH, but {folder} has no `python` that is "
                        f"{interpreter}; set PYTHON to an interpreter named python (e.g. a venv's bin/python)")
    msrun = shutil.which("msrun", path=folder + os.pathsep + environ.get("PATH", ""))
    if msrun is None:
        raise UserError(f"msrun not found next to {interpreter} or on PATH; install mindspore in that environment")
    return os.path.abspath(msrun), folder


def _msrun_process(options: LaunchOptions, environ: Mapping[str, str], command: TrainCommand, total: int,
                   local: int, node_rank: int, master: str, extra_env=(), extra_args=()) -> Process:
    msrun, folder = _msrun_executable(options, environ)
    argv = [msrun, f"--worker_num={total}", f"--local_worker_num={local}", f"--master_addr={master}",
            f"--master_port={options.master_port}", f"--node_rank={node_rank}", f"--log_dir={options.log_dir}",
            "--join=True", f"--cluster_time_out={options.cluster_time_out}",
            # A rank that does not exist: no `tail -f` per worker (the launcher follows one log itself,
            # and msrun's tails outlive a killed msrun).
            f"--tail_worker_log={total}", *(["--bind_core=True"] if options.bind_core else []), *extra_args,
            TRAIN_SCRIPT, *command.args]
    return Process(tuple(argv), tuple(extra_env) + _rank_env(options), os.path.join(options.log_dir, MSRUN_LOG),
                   path_prefix=folder)


def _agree(flag: str, given: Optional[int], derived: int, source: str) -> None:
    if given is not None and given != derived:
        raise UserError(f"{flag} {given} disagrees with {source}, which says {derived}; drop {flag} or fix it")


def _cpu_plan(options: LaunchOptions, environ: Mapping[str, str]) -> LaunchPlan:
    workers = options.workers
    if requested_parallel(options.config, options.train_args, "pipeline_stage") > 1:
        raise UserError("parallel.pipeline_stage > 1 is planned, but the pipelined train step is not built; set "
                        "parallel.pipeline_stage: 1 (the 512-card layout uses no pipeline)")
    model_parallel = requested_parallel(options.config, options.train_args, "model_parallel")
    if workers % model_parallel:
        raise UserError(f"--workers {workers} is not data_parallel x model_parallel: parallel.model_parallel is "
                        f"{model_parallel}; start a multiple of {model_parallel} workers")
    command = check_train_args(options.config, options.train_args, {
        "parallel.mode": "hybrid_parallel", "parallel.device_num": workers,
        "parallel.data_parallel": workers // model_parallel, "context.device_target": "CPU"}, "--cpu --workers")
    check_layout(command, workers, "--workers starts")
    process = _msrun_process(options, environ, command, workers, workers, 0, "127.0.0.1")
    p = command.config.parallel
    summary = (f"{PROG}: --cpu, {workers} msrun worker(s) on 127.0.0.1:{options.master_port}, data {p.data_parallel} x "
               f"model {p.model_parallel}, experts over {p.expert_parallel}; "
               f"{_interpreter_note(options)}")
    return LaunchPlan(summary, (process,), True, tuple(range(workers)), options.log_dir, options.master_port,
                      _coordinates(command, range(workers)))


def _msrun_layout_from_table(layout: RankTableLayout, server: Server) -> Tuple[int, int, str]:
    """(devices per node, node rank, master address) of a rank table, in msrun's numbering."""
    devices = len(server.ranks)
    if any(len(other.ranks) != devices for other in layout.servers):
        raise UserError(f"{layout.path}: servers hold different numbers of devices; msrun needs the same number "
                        f"on every node (use --rank-table without --msrun)")
    first = server.ranks[0][0]
    expected = [(first + index, index) for index in range(devices)]
    mismatch = next((pair for pair, want in zip(server.ranks, expected) if pair != want), None)
    if first % devices or mismatch:
        rank, device = mismatch or server.ranks[0]
        raise UserError(f"{layout.path}: server {server.server_id} has rank {rank} on device {device}, but msrun puts "
                        f"rank node_rank*{devices}+i on device i; launch this table with --rank-table alone")
    master = next(other.server_id for other in layout.servers if other.ranks[0][0] == 0)
    return devices, first // devices, master


def _msrun_plan(options: LaunchOptions, environ: Mapping[str, str]) -> LaunchPlan:
    command = check_train_args(options.config, options.train_args)
    extra_args: Tuple[str, ...] = ()
    if options.rank_table:
        layout = read_rank_table(options.rank_table)
        server = layout.server(options.server_id)
        devices, node_rank, table_master = _msrun_layout_from_table(layout, server)
        nnodes = len(layout.servers)
        for flag, given, derived in (("--devices", options.devices, devices), ("--nnodes", options.nnodes, nnodes),
                                     ("--node-rank", options.node_rank, node_rank)):
            _agree(flag, given, derived, options.rank_table)
        if options.master_addr and nnodes > 1 and options.master_addr != table_master:
            raise UserError(f"--master-addr {options.master_addr} disagrees with {options.rank_table}, whose rank 0 "
                            f"is on {table_master}; drop --master-addr or fix it")
        master = options.master_addr or (table_master if nnodes > 1 else "127.0.0.1")
        if nnodes > 1 and not options.master_addr:
            check_master_addr(master, f"rank 0's server in {options.rank_table}")
        extra_args = (f"--rank_table_file={options.rank_table}",)
        where = f"rank table {options.rank_table}, "
    else:
        devices, nnodes = options.devices or DEFAULT_DEVICES, options.nnodes or 1
        node_rank, master = options.node_rank or 0, options.master_addr or "127.0.0.1"
        where = ""
    total = devices * nnodes
    check_layout(command, total, f"msrun would start {nnodes} node(s) x {devices} device(s) =")
    process = _msrun_process(options, environ, command, total, devices, node_rank, master, _hccl_env(environ),
                             extra_args)
    first = node_rank * devices
    summary = (f"{PROG}: --msrun, {where}node {node_rank} of {nnodes} (ranks {_span(range(first, first + devices))} "
               f"of {total} on devices {_span(range(devices))}), master {master}:{options.master_port}; "
               f"{_interpreter_note(options)}")
    return LaunchPlan(summary, (process,), True, tuple(range(first, first + devices)), options.log_dir,
                      options.master_port if node_rank == 0 else None, _coordinates(command, range(first, first + devices)))


def _rank_table_plan(options: LaunchOptions, environ: Mapping[str, str]) -> LaunchPlan:
    command = check_train_args(options.config, options.train_args)
    layout = read_rank_table(options.rank_table)
    server = layout.server(options.server_id)
    _agree("--devices", options.devices, len(server.ranks), f"{options.rank_table} (server {server.server_id})")
    check_layout(command, layout.size, f"{options.rank_table} lists")
    processes = []
    for rank, device in server.ranks:
        env = (("RANK_TABLE_FILE", options.rank_table), ("RANK_ID", str(rank)), ("DEVICE_ID", str(device)),
               ("RANK_SIZE", str(layout.size))) + _hccl_env(environ) + _rank_env(options)
        processes.append(Process((options.interpreter.path, TRAIN_SCRIPT, *command.args), env,
                                 rank_log(options.log_dir, rank, uses_msrun=False), rank))
    ranks = [rank for rank, _ in server.ranks]
    summary = (f"{PROG}: --rank-table {options.rank_table}, server {server.server_id} (ranks {_span(ranks)} of "
               f"{layout.size} on devices {_span([device for _, device in server.ranks])}); "
               f"{_interpreter_note(options)}")
    return LaunchPlan(summary, tuple(processes), False, tuple(ranks), options.log_dir,
                      coordinates=_coordinates(command, ranks))


def build_plan(options: LaunchOptions, environ: Mapping[str, str] = os.environ) -> LaunchPlan:
    """Check the launch against the config and the rank table, and decide every process it starts."""
    builders = {"cpu": _cpu_plan, "msrun": _msrun_plan, "rank_table": _rank_table_plan}
    plan = builders[options.mode](options, environ)
    return dataclasses.replace(plan, summary=one_line(plan.summary))  # a path may hold a line break
