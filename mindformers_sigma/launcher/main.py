"""The launcher's command: check everything, print the plan, then start and supervise the ranks.

Exit codes: 0 every rank succeeded; 2 bad arguments or a failed check (nothing was started);
3 a rank (or msrun) failed and the others were stopped; 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM, 129 SIGHUP); 1 an internal error of the launcher.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from mindformers_sigma.errors import run_reporting_errors
from mindformers_sigma.launcher.options import PROG, parse_options
from mindformers_sigma.launcher.plan import build_plan
from mindformers_sigma.launcher.supervisor import RankFailed, supervise


def _launch(argv: Sequence[str]) -> int:
    options = parse_options(argv, os.environ)
    plan = build_plan(options, os.environ)
    if options.dry_run:
        sys.stdout.write(plan.script())
        return 0
    print(plan.summary, flush=True)
    try:
        return supervise(plan, options.grace_seconds)
    except RankFailed as failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return failure.exit_code


def main(argv: Sequence[str]) -> int:
    return run_reporting_errors(PROG, lambda: _launch(argv))
