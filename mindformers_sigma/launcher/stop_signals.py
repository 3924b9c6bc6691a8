"""SIGINT, SIGTERM and SIGHUP for the launcher: recorded from its first moment, acted on by the supervisor.

Installed before anything else is imported, so that a Ctrl-C during the checks is not lost (a
background job of a non-interactive shell starts with SIGINT ignored, so Python's own handler
would not be there either).
"""

from __future__ import annotations

import signal
from typing import List

from mindformers_sigma.errors import Interrupted

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP received since :meth:`install`, recorded rather than acted on at once."""

    def __init__(self):
        self.received: List[int] = []

    def install(self) -> "StopSignals":
        for signum in _STOP_SIGNALS:
            # A background job of a non-interactive shell starts with SIGINT ignored: Ctrl-C must
            # still stop the ranks.  Under nohup, SIGHUP stays ignored.
            if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received.append(signum)

    def raise_if_any(self, what: str) -> None:
        if self.received:
            raise Interrupted(f"stopped by {signal.Signals(self.received[0]).name}: {what}", 128 + self.received[0])
