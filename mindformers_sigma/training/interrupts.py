"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, stop cleanly.

MindSpore installs its own C handlers while a graph runs (a Ctrl-C that lands inside a graph
comes back as SIGTERM, and the default behaviour kills the process with nothing saved), so the
trainer re-arms these Python handlers before every step.  They only record the signal; the loop
looks at it between steps, where stopping is safe.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from mindformers_sigma.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """The first SIGINT/SIGTERM received since the handlers were armed, if any."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.enabled = threading.current_thread() is threading.main_thread()  # signal.signal needs the main thread

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def arm(self) -> None:
        if self.enabled:
            for signum in _SIGNALS:
                signal.signal(signum, self._record)

    def raise_now(self, what: str) -> None:
        """Raise :class:`Interrupted`: exit 130 for SIGINT, 143 for SIGTERM, also when it was another
        rank that received the signal (the ranks stop together)."""
        if self.signum is None:
            raise Interrupted(f"stopped because another rank received a stop signal, {what}", 143)
        raise Interrupted(f"stopped by {signal.Signals(self.signum).name} {what}", 128 + self.signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Record stop signals for the duration of a run; the previous handlers come back after."""
    requests = StopRequests()
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS} if requests.enabled else {}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
