"""Start a launch plan and watch it until every rank has ended, leaving nothing behind.

- The first rank to fail stops the others at once (on hardware they would otherwise wait in a
  collective until HCCL_EXEC_TIMEOUT, 20 minutes), and the launcher exits 3 naming it.
- SIGINT, SIGTERM and SIGHUP stop every rank: SIGTERM to each rank's process group (the trainer
  finishes its step and saves a checkpoint), then SIGKILL after the grace period or at a second
  signal; exit 128 + signal.
- The launcher adopts orphaned descendants (a child subreaper), so a rank whose msrun died is
  still found and stopped; each process it starts gets SIGTERM if the launcher itself is killed.
- One launch per log folder at a time (a lock), so two launches never write into each other's logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import BinaryIO, Dict, List, Optional, TextIO, Union

from mindformers_sigma.errors import DataError, Interrupted
from mindformers_sigma.folder_lock import FolderBusy, lock_folder
from mindformers_sigma.launcher.plan import LaunchPlan
from mindformers_sigma.launcher.processes import (ProcessInfo, become_subreaper, descendants, die_with_parent,
                                                  process_table, send, send_to_group)
from mindformers_sigma.launcher.rank_watch import DirectRanks, MsrunRanks
from mindformers_sigma.launcher.stop_signals import StopSignals

RANK_FAILED_EXIT = 3
LOCK_NAME = ".launch.lock"


class RankFailed(Exception):
    """A rank (or msrun) failed; the others were stopped."""

    exit_code = RANK_FAILED_EXIT


class LogFollower:
    """Copies what a rank appends to its log onto our stdout, as `tail -F` would."""

    def __init__(self, path: str, out: Optional[BinaryIO]):
        self.path, self.out = path, out
        self._handle: Optional[BinaryIO] = None

    def pump(self) -> None:
        if self.out is None:
            return
        if self._handle is None:
            try:
                self._handle = open(self.path, "rb")
            except OSError:
                return
        try:
            if os.fstat(self._handle.fileno()).st_size < self._handle.tell():
                self._handle.seek(0)  # the file was truncated (msrun reopens it): start again
        except OSError:
            return
        chunk = self._handle.read()
        if chunk:
            try:
                self.out.write(chunk)
                self.out.flush()
            except OSError:  # our stdout went away (a closed pipe): keep supervising, stop echoing
                self.out = None
                silence_stdout()

    def close(self) -> None:
        self.pump()
        if self._handle is not None:
            self._handle.close()


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so that nothing later (a print, Python's
    flush at exit) fails on it and changes the exit code."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _lock_log_dir(log_dir: str) -> TextIO:
    """Hold an exclusive lock on the log folder for the whole launch (released when the process ends)."""
    os.makedirs(log_dir, exist_ok=True)
    try:
        return lock_folder(log_dir, LOCK_NAME)
    except FolderBusy:
        raise DataError(f"--log-dir {log_dir} is used by another launch that is still running; wait for it or give "
                        f"another --log-dir") from None


class Supervisor:
    def __init__(self, plan: LaunchPlan, grace_seconds: float, signals: StopSignals, out: Optional[BinaryIO]):
        self.plan, self.grace_seconds, self.signals, self.out = plan, grace_seconds, signals, out
        self.watch: Union[DirectRanks, MsrunRanks] = DirectRanks([])
        self.grace_cut_short = False

    def _start(self) -> None:
        """Open every log first (a log that cannot be written stops the launch before any rank runs),
        then start the processes."""
        logs = [open(process.log, "wb") for process in self.plan.processes]
        started = []
        try:
            for process, log in zip(self.plan.processes, logs):
                popen = subprocess.Popen(process.argv, env=process.environment(os.environ),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
                started.append((process.rank, popen, process.log))
        finally:
            for log in logs:
                log.close()
            if self.plan.uses_msrun and started:
                self.watch = MsrunRanks(started[0][1], self.plan.local_ranks, self.plan.rank_log,
                                        self.plan.scheduler_log, self.plan.msrun_log,
                                        expects_scheduler=self.plan.scheduler_port is not None)
            else:
                self.watch = DirectRanks(started)

    def _poll(self) -> Dict[int, ProcessInfo]:
        """Look at every process once: update the ranks' states, reap adopted zombies; returns what it saw."""
        table = process_table()
        self.watch.update(table)
        me, own = os.getpid(), set(self.watch.own_children)
        for info in table.values():
            if info.ppid == me and not info.alive and info.pid not in own:
                try:
                    os.waitpid(info.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        return table

    def _alive_descendants(self, table: Optional[Dict[int, ProcessInfo]] = None) -> List[int]:
        table = process_table() if table is None else table
        return [pid for pid in descendants(os.getpid(), table) if table[pid].alive]

    def _stop_all(self, follower: LogFollower, everything: bool = False, signals_allowed: Optional[int] = None
                  ) -> List[int]:
        """SIGTERM (msrun first, then each rank's process group; with ``everything``, every process
        left), wait up to the grace period, then SIGKILL whatever is left.  A stop signal beyond the
        first ``signals_allowed`` (default: those already received) cuts the grace period short.
        Returns what needed SIGKILL."""
        for pid in self.watch.first_to_stop():
            send(pid, signal.SIGTERM)
        if everything:
            for pid in self._alive_descendants():
                send(pid, signal.SIGTERM)
        signalled: set = set()
        allowed = len(self.signals.received) if signals_allowed is None else signals_allowed
        deadline = time.monotonic() + self.grace_seconds
        while True:
            for pid in set(self.watch.running()) - signalled:  # ranks recognised since are stopped too
                send_to_group(pid, signal.SIGTERM)
                signalled.add(pid)
            if len(self.signals.received) > allowed:
                self.grace_cut_short = True
                break
            if time.monotonic() >= deadline:
                break
            table = self._poll()
            follower.pump()
            if not self._alive_descendants(table):
                return []
            time.sleep(0.05)
        killed = left = self._alive_descendants()
        for _ in range(100):
            if not left:
                break
            for pid in left:
                send(pid, signal.SIGKILL)
            time.sleep(0.05)
            left = self._alive_descendants(self._poll())
        for popen_pid in self.watch.own_children:
            try:
                os.waitpid(popen_pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return killed

    def _killed_note(self, killed: List[int]) -> str:
        when = "at a second signal" if self.grace_cut_short else "after the grace period"
        return f"; {len(killed)} process(es) needed SIGKILL {when}" if killed else ""

    def _stopped_by_signal(self, follower: LogFollower) -> Interrupted:
        failed_before = self.watch.failures()  # a rank that died by itself just before: say so too
        killed = self._stop_all(follower, signals_allowed=1)  # a second signal, however quick, cuts it short
        signum = self.signals.received[0]
        also = f"; before that, {'; '.join(failed_before)}" if failed_before else ""
        return Interrupted(f"stopped by {signal.Signals(signum).name}: every rank was stopped"
                           f"{self._killed_note(killed)}{also} (logs in {self.plan.log_dir})", 128 + signum)

    def run(self) -> int:
        """Run the plan to the end; returns 0, or raises Interrupted / RankFailed after stopping every rank."""
        lock = _lock_log_dir(self.plan.log_dir)
        become_subreaper()
        follower = LogFollower(self.plan.rank_log(self.plan.local_ranks[0]), self.out)
        if self.plan.uses_msrun:  # msrun truncates it, but the follower must not show a previous launch's lines
            with open(follower.path, "wb"):
                pass
        started = time.monotonic()
        try:
            try:
                self._start()
            except BaseException:
                self._stop_all(follower)  # what did start, if a later rank could not
                raise
            while True:
                self._poll()
                follower.pump()
                if self.signals.received:
                    raise self._stopped_by_signal(follower)
                failures = self.watch.failures()
                if failures:
                    killed = self._stop_all(follower)
                    raise RankFailed("; ".join(failures) + "; the other ranks were stopped" + self._killed_note(killed))
                if self.watch.finished():
                    if self._alive_descendants():  # strays of a finished run (a rank's helper process)
                        self._stop_all(follower, everything=True)
                    return 0
                # Often while ranks start (one may fail within milliseconds), then twice a second.
                time.sleep(0.05 if time.monotonic() - started < 10 else 0.5)
        finally:
            follower.close()
            lock.close()


def supervise(plan: LaunchPlan, grace_seconds: float, signals: StopSignals) -> int:
    return Supervisor(plan, grace_seconds, signals, sys.stdout.buffer).run()
