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
from mindformers_sigma.launcher.supervisor import RankFailed, supervise


def _launch(argv: Sequence[str], signals: StopSignals) -> int:
    options = parse_options(argv, os.environ)
    plan = build_plan(options, os.environ)
    if options.dry_run:
        try:
            sys.stdout.write(plan.script())
            sys.stdout.flush()
        except BrokenPipeError:  # `--dry-run | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    signals.raise_if_any("before any rank was started")
    if plan.scheduler_port is not None:
        check_port_free(plan.scheduler_port)
    print(plan.summary, flush=True)
    try:
        return supervise(plan, options.grace_seconds, signals)
    except RankFailed as failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return failure.exit_code


def main(argv: Sequence[str], signals: Optional[StopSignals] = None) -> int:
    signals = signals or StopSignals().install()
    return run_reporting_errors(PROG, lambda: _launch(argv, signals))
