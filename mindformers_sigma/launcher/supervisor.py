"""Start a launch plan and watch it until every rank has ended, leaving nothing behind.

- The first rank to fail stops the others at once (on hardware they would otherwise wait in a
  collective until HCCL_EXEC_TIMEOUT, 20 minutes), and the launcher exits 3 naming it.
- SIGINT, SIGTERM and SIGHUP stop every rank: SIGTERM (the trainer finishes its step and saves a
  checkpoint), then SIGKILL after the grace period or at a second signal; exit 128 + signal.
- The launcher adopts orphaned descendants (a child subreaper), so a rank whose msrun died is
  still found and stopped; each process it starts gets SIGTERM if the launcher itself is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import BinaryIO, Dict, List, Optional, Union

from mindformers_sigma.errors import Interrupted
from mindformers_sigma.launcher.plan import LaunchPlan
from mindformers_sigma.launcher.processes import (ProcessInfo, become_subreaper, descendants, die_with_parent,
                                                  process_table, send)
from mindformers_sigma.launcher.rank_watch import DirectRanks, MsrunRanks

RANK_FAILED_EXIT = 3
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RankFailed(Exception):
    """A rank (or msrun) failed; the others were stopped."""

    exit_code = RANK_FAILED_EXIT


class LogFollower:
    """Copies what a rank appends to its log onto our stdout, as `tail -f` would."""

    def __init__(self, path: str, out: BinaryIO):
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
        chunk = self._handle.read()
        if chunk:
            try:
                self.out.write(chunk)
                self.out.flush()
            except OSError:  # our stdout went away (a closed pipe): keep supervising, stop echoing
                self.out = None

    def close(self) -> None:
        self.pump()
        if self._handle is not None:
            self._handle.close()


class Supervisor:
    def __init__(self, plan: LaunchPlan, grace_seconds: float, out: BinaryIO):
        self.plan, self.grace_seconds, self.out = plan, grace_seconds, out
        self.signals: List[int] = []
        self.watch: Union[DirectRanks, MsrunRanks, None] = None

    def _record_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _install_handlers(self) -> None:
        for signum in _STOP_SIGNALS:
            # A background job of a non-interactive shell starts with SIGINT ignored: Ctrl-C must
            # still stop the ranks.  Under nohup, SIGHUP stays ignored.
            if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._record_signal)

    def _start(self) -> None:
        os.makedirs(self.plan.log_dir, exist_ok=True)
        started = []
        try:
            for process in self.plan.processes:
                with open(process.log, "wb") as log:
                    popen = subprocess.Popen(process.argv, env=process.environment(os.environ),
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, preexec_fn=die_with_parent)
                started.append((process.rank, popen, process.log))
        finally:
            if self.plan.uses_msrun and started:
                self.watch = MsrunRanks(started[0][1], self.plan.local_ranks, self.plan.rank_log,
                                        os.path.join(self.plan.log_dir, "scheduler.log"), self.plan.msrun_log)
            else:
                self.watch = DirectRanks(started)

    def _poll(self) -> Dict[int, ProcessInfo]:
        """Look at every process once: update the ranks' states, reap adopted zombies."""
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

    def _alive_descendants(self) -> List[int]:
        table = process_table()
        return [pid for pid in descendants(os.getpid(), table) if table[pid].alive]

    def _stop_all(self, follower: LogFollower) -> List[int]:
        """SIGTERM (msrun first), wait up to the grace period, then SIGKILL whatever is left.
        Returns the pids that needed SIGKILL."""
        for pid in self.watch.first_to_stop():
            send(pid, signal.SIGTERM)
        signalled = set()
        signals_before = len(self.signals)
        deadline = time.monotonic() + self.grace_seconds
        while time.monotonic() < deadline and len(self.signals) == signals_before:
            for pid in set(self.watch.running()) - signalled:  # ranks recognised since are stopped too
                send(pid, signal.SIGTERM)
                signalled.add(pid)
            self._poll()
            follower.pump()
            if not self._alive_descendants():
                return []
            time.sleep(0.05)
        killed = self._alive_descendants()
        for _ in range(100):
            left = self._alive_descendants()
            if not left:
                break
            for pid in left:
                send(pid, signal.SIGKILL)
            time.sleep(0.05)
            self._poll()
        for popen_pid in self.watch.own_children:
            try:
                os.waitpid(popen_pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return killed

    def run(self) -> int:
        """Run the plan to the end; returns 0, or raises Interrupted / RankFailed after stopping every rank."""
        become_subreaper()
        self._install_handlers()
        follower = LogFollower(self.plan.rank_log(self.plan.local_ranks[0]), self.out)
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
                if self.signals:
                    killed = self._stop_all(follower)
                    name = signal.Signals(self.signals[0]).name
                    note = f"; {len(killed)} process(es) needed SIGKILL after the grace period" if killed else ""
                    raise Interrupted(f"stopped by {name}: every rank was stopped{note} (logs in "
                                      f"{self.plan.log_dir})", 128 + self.signals[0])
                failures = self.watch.failures()
                if failures:
                    self._stop_all(follower)
                    raise RankFailed("; ".join(failures) + "; the other ranks were stopped")
                if self.watch.finished():
                    if self._alive_descendants():  # strays of a finished run (a rank's helper process)
                        self._stop_all(follower)
                    return 0
                # Often while ranks start (one may fail within milliseconds), then twice a second.
                time.sleep(0.05 if time.monotonic() - started < 10 else 0.5)
        finally:
            follower.close()


def supervise(plan: LaunchPlan, grace_seconds: float, out: Optional[BinaryIO] = None) -> int:
    return Supervisor(plan, grace_seconds, out if out is not None else sys.stdout.buffer).run()
