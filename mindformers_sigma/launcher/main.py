"""The launcher's command: check everything, print the plan, then start and supervise the ranks.

Exit codes: 0 every rank succeeded; 2 bad arguments or a failed check (nothing was started);
3 a rank (or msrun) failed and the others were stopped; 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM, 129 SIGHUP); 1 an internal error of the launcher.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from mindformers_sigma.errors import run_reporting_errors
from mindformers_sigma.launcher.checks import check_port_free
from mindformers_sigma.launcher.options import PROG, parse_options
from mindformers_sigma.launcher.plan import build_plan
from mindformers_sigma.launcher.stop_signals import StopSignals
from mindformers_sigma.launcher.supervisor import RankFailed, silence_stdout, supervise


def _print(text: str) -> None:
    """Print to stdout; a reader that went away (`| head`) is not an error of the launch."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


def _launch(argv: Sequence[str], signals: StopSignals) -> int:
    options = parse_options(argv, os.environ)
    plan = build_plan(options, os.environ)
    if options.dry_run:
        _print(plan.script())
        signals.raise_if_any("during the dry run")
        return 0
    signals.raise_if_any("before any rank was started")
    if plan.scheduler_port is not None:
        check_port_free(plan.scheduler_port)
    _print(plan.summary + "\n")
    try:
        return supervise(plan, options.grace_seconds, signals)
    except RankFailed as failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return failure.exit_code


def main(argv: Sequence[str], signals: Optional[StopSignals] = None) -> int:
    signals = signals or StopSignals().install()
    if sys.stdout is None:  # started with stdout closed (`>&-`): run, showing nothing
        sys.stdout = open(os.devnull, "w")
    return run_reporting_errors(PROG, lambda: _launch(argv, signals))
