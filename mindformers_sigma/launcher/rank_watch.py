"""Which rank is which process, and how each ended: for ranks the launcher starts itself and for
ranks msrun starts.

Ranks started directly are the launcher's children and their exit codes come from ``wait``.  msrun's
ranks are msrun's children, in their own sessions: they are recognised by the environment msrun
gives each (``MS_ROLE``, ``RANK_ID``), and an exit code is read from the zombie's /proc entry
before msrun reaps it, else from the line msrun logs for it, else (a rank adopted by the launcher
after msrun died) from the launcher's own ``wait``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mindformers_sigma.launcher.processes import ProcessInfo, environment, exit_code

_NAMING_WAIT_SECONDS = 3.0
_MSRUN_FAILURE = re.compile(rb"Worker process (\d+) exit with exception\. Error code: (-?\d+)\.")


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
    rank: Optional[int]  # None: msrun's scheduler
    log: str
    exit_code: Optional[int] = None
    ended: bool = False

    @property
    def name(self) -> str:
        return "msrun's scheduler" if self.rank is None else f"rank {self.rank}"

    def end(self, code: Optional[int]) -> None:
        self.ended, self.exit_code = True, code


class DirectRanks:
    """Ranks the launcher started itself (rank-table mode)."""

    def __init__(self, started: Sequence[Tuple[int, "subprocess.Popen[bytes]", str]]):
        self._popens = {popen.pid: popen for _, popen, _ in started}
        self.ranks = [RankProcess(popen.pid, 0, rank, log) for rank, popen, log in started]

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
        return [describe_process(rank) for rank in self.ranks if rank.ended and rank.exit_code != 0]

    def finished(self) -> bool:
        return all(rank.ended for rank in self.ranks)

    def first_to_stop(self) -> List[int]:
        return []

    def running(self) -> List[int]:
        return [rank.pid for rank in self.ranks if not rank.ended]


class MsrunRanks:
    """msrun and the scheduler and ranks it starts (``--msrun`` and ``--cpu``)."""

    def __init__(self, msrun: "subprocess.Popen[bytes]", local_ranks: Sequence[int], log_of, scheduler_log: str,
                 msrun_log: str):
        self.msrun = msrun
        self.msrun_code: Optional[int] = None
        self._local_ranks = list(local_ranks)
        self._log_of = log_of
        self._scheduler_log = scheduler_log
        self._msrun_log = msrun_log
        self.ranks: List[RankProcess] = []
        self._unnamed: List[RankProcess] = []  # died before their environment could be read
        self._seen: set = set()
        self._first_failure_at: Optional[float] = None

    @property
    def own_children(self) -> List[int]:
        return [self.msrun.pid]

    def _recognise(self, info: ProcessInfo) -> None:
        env = environment(info.pid)
        role = (env or {}).get("MS_ROLE")
        if role == "MS_WORKER" and (env.get("RANK_ID") or "").isdigit():
            rank = int(env["RANK_ID"])
            self.ranks.append(RankProcess(info.pid, info.start_time, rank, self._log_of(rank)))
        elif role == "MS_SCHED":
            self.ranks.append(RankProcess(info.pid, info.start_time, None, self._scheduler_log))
        elif info.alive:
            return  # not exec'd yet (it still shows msrun's environment): look again next time
        else:
            self._unnamed.append(RankProcess(info.pid, info.start_time, None, ""))
        self._seen.add((info.pid, info.start_time))

    def update(self, table: Dict[int, ProcessInfo]) -> None:
        if self.msrun_code is None:
            for info in table.values():
                if info.ppid == self.msrun.pid and (info.pid, info.start_time) not in self._seen:
                    self._recognise(info)
            self.msrun_code = self.msrun.poll()
        logged = None
        for process in self.ranks + self._unnamed:
            if process.ended:
                continue
            info = table.get(process.pid)
            if info is not None and info.start_time == process.start_time and info.alive:
                continue
            if info is not None and info.start_time == process.start_time:
                process.end(exit_code(info.wait_status))  # a zombie: its status is still readable
                continue
            logged = self._logged_codes() if logged is None else logged
            if process.pid in logged:
                process.end(logged[process.pid])
            elif self.msrun_code is not None:
                process.end(0 if self.msrun_code == 0 else None)

    def _logged_codes(self) -> Dict[int, int]:
        try:
            with open(self._msrun_log, "rb") as handle:
                return {int(pid): int(code) for pid, code in _MSRUN_FAILURE.findall(handle.read())}
        except OSError:
            return {}

    def _name_unnamed(self) -> bool:
        """Name the ranks that died too fast to be recognised: msrun starts rank first+i as its i-th
        worker, so by pid order they are the local ranks never seen, in order.  False while that is
        not yet decidable (some other rank has not been seen yet either)."""
        unnamed = sorted((p for p in self._unnamed if p.rank is None), key=lambda p: p.pid)
        missing = sorted(set(self._local_ranks) - {p.rank for p in self.ranks + self._unnamed if p.rank is not None})
        if not unnamed:
            return True
        if len(unnamed) != len(missing):
            return False
        for process, rank in zip(unnamed, missing):
            process.rank, process.log = rank, self._log_of(rank)
        return True

    def failures(self) -> List[str]:
        failed = [p for p in self.ranks + self._unnamed if p.ended and p.exit_code != 0]
        if failed or self.msrun_code not in (None, 0):
            # msrun logs the first rank it finds failed, then SIGKILLs the others: once it has logged,
            # its line names the cause (even a rank that died before we could see it), not its kills.
            logged = self._logged_codes()
            known = {p.pid: p for p in self.ranks + self._unnamed}
            for pid, code in logged.items():
                if pid not in known:
                    self._unnamed.append(RankProcess(pid, 0, None, "", code, True))
                elif not known[pid].ended:
                    known[pid].end(code)
            if logged:
                failed = [p for p in self.ranks + self._unnamed if p.pid in logged]
            self._first_failure_at = self._first_failure_at or time.monotonic()
            if not self._name_unnamed() and time.monotonic() - self._first_failure_at < _NAMING_WAIT_SECONDS:
                return []  # the other ranks are still starting: wait a moment to tell which rank this was
        if not failed and self.msrun_code not in (None, 0):
            return [describe_exit("msrun", self.msrun_code, self._msrun_log)]
        return [describe_process(p) for p in by_rank(failed)]

    def finished(self) -> bool:
        return self.msrun_code == 0

    def first_to_stop(self) -> List[int]:
        """msrun goes first: alive, it would SIGKILL every rank as soon as one exits after SIGTERM."""
        return [self.msrun.pid] if self.msrun_code is None else []

    def running(self) -> List[int]:
        return [p.pid for p in self.ranks if not p.ended]


def describe_process(process: RankProcess) -> str:
    if process.rank is None and not process.log:
        return describe_exit(f"a rank (pid {process.pid}; which one is unknown)", process.exit_code,
                             "the worker_*.log files")
    return describe_exit(process.name, process.exit_code, process.log)


def by_rank(processes: Sequence[RankProcess]) -> List[RankProcess]:
    """Ranks in order, then the scheduler and unrecognised processes."""
    return sorted(processes, key=lambda p: (p.rank is None, p.rank or 0))
