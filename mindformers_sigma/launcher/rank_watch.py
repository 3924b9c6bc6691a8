"""Which rank is which process, and how each ended: for ranks the launcher starts itself and for
ranks msrun starts.

Ranks started directly are the launcher's children and their exit codes come from ``wait``.  msrun's
ranks are msrun's children, in their own sessions: they are recognised by the environment msrun
gives each (``MS_ROLE``, ``RANK_ID``), and an exit code is read from the zombie's /proc entry
before its parent (msrun, or the launcher once it has adopted the rank) reaps it, else from the
line msrun logs for it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mindformers_sigma.launcher.processes import ProcessInfo, environment, exit_code, process_table

_NAMING_WAIT_SECONDS = 8.0  # at most; once msrun has exited, every child it had is known
_MSRUN_WORKER_FAILED = re.compile(rb"Worker process (\d+) exit with exception\. Error code: (-?\d+)\.")
_MSRUN_SCHEDULER_FAILED = re.compile(rb"Scheduler process (\d+) exit with exception\.")


def describe_exit(what: str, code: Optional[int], log: str) -> str:
    if code is None:
        return f"{what} ended with an exit code nobody recorded (see {log})"
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"{what} was killed by signal {-code}{name} (see {log})"
    return f"{what} exited with code {code} (see {log})"


@dataclass
class RankProcess:
    pid: int
    start_time: int
    role: str  # "rank", "scheduler" (msrun's), "helper" (msrun's own later child, not a rank) or "unknown"
    rank: Optional[int]
    log: str
    exit_code: Optional[int] = None
    ended: bool = False

    @property
    def name(self) -> str:
        if self.role == "scheduler":
            return "msrun's scheduler"
        if self.rank is None:
            return f"a process msrun started (pid {self.pid}; which rank is unknown)"
        return f"rank {self.rank}"

    def end(self, code: Optional[int]) -> None:
        self.ended, self.exit_code = True, code

    def describe(self) -> str:
        return describe_exit(self.name, self.exit_code, self.log or "the worker_*.log files")


class DirectRanks:
    """Ranks the launcher started itself (rank-table mode)."""

    def __init__(self, started: Sequence[Tuple[int, "subprocess.Popen[bytes]", str]]):
        self._popens = {popen.pid: popen for _, popen, _ in started}
        self.ranks = [RankProcess(popen.pid, 0, "rank", rank, log) for rank, popen, log in started]

    @property
    def own_children(self) -> List[int]:
        return list(self._popens)

    def update(self, table: Dict[int, ProcessInfo]) -> None:
        for rank in self.ranks:
            if not rank.ended:
                code = self._popens[rank.pid].poll()
                if code is not None:
                    rank.end(code)

    def failures(self) -> List[str]:
        return [rank.describe() for rank in self.ranks if rank.ended and rank.exit_code != 0]

    def finished(self) -> bool:
        return all(rank.ended for rank in self.ranks)

    def first_to_stop(self) -> List[int]:
        return []

    def running(self) -> List[int]:
        return [rank.pid for rank in self.ranks if not rank.ended]


class MsrunRanks:
    """msrun and the scheduler and ranks it starts (``--msrun`` and ``--cpu``)."""

    def __init__(self, msrun: "subprocess.Popen[bytes]", local_ranks: Sequence[int], log_of, scheduler_log: str,
                 msrun_log: str, expects_scheduler: bool):
        self.msrun = msrun
        self._expects_scheduler = expects_scheduler  # msrun starts one on the master node, before the ranks
        self.msrun_code: Optional[int] = None
        self._local_ranks = list(local_ranks)
        self._log_of = log_of
        self._scheduler_log = scheduler_log
        self._msrun_log = msrun_log
        self.processes: List[RankProcess] = []
        self._seen: set = set()
        self._first_failure_at: Optional[float] = None

    @property
    def own_children(self) -> List[int]:
        return [self.msrun.pid]

    def _known(self, role: str, rank: Optional[int] = None) -> bool:
        return any(p.role == role and p.rank == rank for p in self.processes)

    def _recognise(self, info: ProcessInfo) -> None:
        env = environment(info.pid) or {}
        role = env.get("MS_ROLE")
        if not info.alive and not env:
            self.processes.append(RankProcess(info.pid, info.start_time, "unknown", None, ""))
        elif role == "MS_WORKER" and (env.get("RANK_ID") or "").isdigit():
            rank = int(env["RANK_ID"])
            # One process per rank: a later child of msrun (its `grep` of the scheduler log) inherits
            # the environment msrun set for its last worker.
            if not self._known("rank", rank):
                self.processes.append(RankProcess(info.pid, info.start_time, "rank", rank, self._log_of(rank)))
        elif role == "MS_SCHED" and not self._known("scheduler"):
            self.processes.append(RankProcess(info.pid, info.start_time, "scheduler", None, self._scheduler_log))
        elif info.alive and role is None:
            return  # not exec'd yet (it still shows msrun's environment): look again next time
        self._seen.add((info.pid, info.start_time))

    def _recognise_children(self, table: Dict[int, ProcessInfo], parents: Sequence[int]) -> None:
        for info in table.values():
            if info.ppid in parents and info.pid != self.msrun.pid and (info.pid, info.start_time) not in self._seen:
                self._recognise(info)

    def update(self, table: Dict[int, ProcessInfo]) -> None:
        if self.msrun_code is None:
            self._recognise_children(table, (self.msrun.pid,))
            self.msrun_code = self.msrun.poll()
            if self.msrun_code is not None:
                # The children msrun left (zombies it never reaped) were re-parented to the launcher, a
                # subreaper, when it exited: look at them once, before the launcher reaps them.
                self._recognise_children(process_table(), (self.msrun.pid, os.getpid()))
        logged = None
        for process in self.processes:
            if process.ended:
                continue
            info = table.get(process.pid)
            if info is not None and info.start_time == process.start_time and info.alive:
                continue
            if info is not None and info.start_time == process.start_time:
                process.end(exit_code(info.wait_status))  # a zombie: its status is still readable
                continue
            logged = self._logged() if logged is None else logged
            if process.pid in logged[0]:
                process.end(logged[0][process.pid])
            elif self.msrun_code is not None:
                process.end(0 if self.msrun_code == 0 else None)

    def _logged(self) -> Tuple[Dict[int, int], set]:
        """msrun's log: {pid: exit code} of failed workers, and the pids of failed schedulers."""
        try:
            with open(self._msrun_log, "rb") as handle:
                text = handle.read()
        except OSError:
            return {}, set()
        return ({int(pid): int(code) for pid, code in _MSRUN_WORKER_FAILED.findall(text)},
                {int(pid) for pid in _MSRUN_SCHEDULER_FAILED.findall(text)})

    def _name_unknown(self, scheduler_pids: set) -> bool:
        """Name the processes that died too fast to be recognised.  msrun starts the scheduler (on the
        master node) and then rank first+i as its i-th worker, so in pid order the children are
        [scheduler,] rank first, first+1, ...  False while that cannot be decided yet."""
        for process in self.processes:
            if process.role == "unknown" and process.pid in scheduler_pids:
                process.role, process.log = "scheduler", self._scheduler_log
        if not any(p.role == "unknown" and p.rank is None for p in self.processes):
            return True
        expected = len(self._local_ranks) + int(self._expects_scheduler)
        children = sorted(self.processes, key=lambda p: p.pid)
        if len(children) < expected:
            return False  # some child not seen yet
        for later in children[expected:]:  # started after every rank: msrun's `grep` of the scheduler log
            if later.role == "unknown":
                later.role = "helper"
        children = children[:expected]
        if self._expects_scheduler and not self._known("scheduler"):
            if children[0].role != "unknown":
                return False
            children[0].role, children[0].log = "scheduler", self._scheduler_log
        workers = [p for p in children if p.role != "scheduler"]
        for process, rank in zip(workers, self._local_ranks):
            if process.role == "unknown":
                process.rank, process.log = rank, self._log_of(rank)
        return True

    def failures(self) -> List[str]:
        failed = [p for p in self.processes if p.ended and p.exit_code != 0 and p.role != "helper"]
        if failed or self.msrun_code not in (None, 0):
            # msrun logs the first rank it finds failed, then SIGKILLs the others: once it has logged,
            # its line names the cause (even a rank that died before we could see it), not its kills.
            codes, scheduler_pids = self._logged()
            known = {p.pid: p for p in self.processes}
            for pid, code in codes.items():
                if pid not in known:
                    self.processes.append(RankProcess(pid, 0, "unknown", None, "", code, True))
                elif not known[pid].ended:
                    known[pid].end(code)
            for pid in scheduler_pids - set(known):  # reaped by msrun before we saw it
                self.processes.append(RankProcess(pid, 0, "scheduler", None, self._scheduler_log, None, True))
            self._first_failure_at = self._first_failure_at or time.monotonic()
            if not self._name_unknown(scheduler_pids) and self.msrun_code is None and \
                    time.monotonic() - self._first_failure_at < _NAMING_WAIT_SECONDS:
                return []  # the other ranks are still starting: wait a moment to tell which rank this was
            failed = [p for p in self.processes if p.pid in codes] if codes else \
                [p for p in failed if p.role != "helper"]
        if not failed and self.msrun_code not in (None, 0):
            return [describe_exit("msrun", self.msrun_code, self._msrun_log)]
        return [p.describe() for p in by_rank(failed)]

    def finished(self) -> bool:
        return self.msrun_code == 0

    def first_to_stop(self) -> List[int]:
        """msrun goes first: alive, it would SIGKILL every rank as soon as one exits after SIGTERM."""
        return [self.msrun.pid] if self.msrun_code is None else []

    def running(self) -> List[int]:
        return [p.pid for p in self.processes if not p.ended and p.role != "unknown"]


def by_rank(processes: Sequence[RankProcess]) -> List[RankProcess]:
    """Ranks in order, then the scheduler and unrecognised processes."""
    return sorted(processes, key=lambda p: (p.rank is None, p.rank or 0))
