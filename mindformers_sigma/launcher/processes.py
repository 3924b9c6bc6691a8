"""Linux process facts the launcher needs, read from /proc, and the two prctl settings it uses.

The launcher must find every process a launch created (msrun starts its workers in their own
sessions, so process groups do not cover them), tell the living from zombies, and read the exit
status of a process it is not the parent of.  /proc gives all three without a new dependency.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    start_time: int  # clock ticks since boot: (pid, start_time) names one process, pids are reused
    wait_status: int  # as waitpid(2) reports it; meaningful for a zombie

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read_stat(pid: int) -> Optional[ProcessInfo]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    exit_code = int(fields[49]) if len(fields) > 49 else 0  # field 52, Linux >= 3.5
    return ProcessInfo(pid, int(fields[1]), fields[0], int(fields[19]), exit_code)


def process_table() -> Dict[int, ProcessInfo]:
    """Every process visible in /proc now."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _read_stat(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root: int, table: Dict[int, ProcessInfo]) -> List[int]:
    """Pids of every process below ``root`` (children, their children, ...)."""
    children: Dict[int, List[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def environment(pid: int) -> Optional[Dict[str, str]]:
    """The environment a process was started with (None once it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    pairs = (item.decode("utf-8", "replace").partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def exit_code(wait_status: int) -> int:
    """A waitpid status as subprocess reports it: the exit code, or -N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Adopt every orphaned descendant (a worker whose msrun died is re-parented to us, not to init),
    so that nothing the launch started can leave the process tree the launcher stops."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (survives exec)."""
    return _prctl(_PR_SET_PDEATHSIG, int(signum))


def send(pid: int, signum: int) -> None:
    """Signal a process that may already be gone."""
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def send_to_group(pid: int, signum: int) -> None:
    """Signal a process and, if it leads its process group (a rank does), everything in that group:
    the helper processes a rank starts stop with it."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
            return
    except (ProcessLookupError, PermissionError):
        pass
    send(pid, signum)
