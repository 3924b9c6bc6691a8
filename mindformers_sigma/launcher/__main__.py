"""`python -m mindformers_sigma.launcher ARGS`: what run/distributed_train.sh runs."""

import sys

from mindformers_sigma.launcher.stop_signals import StopSignals

SIGNALS = StopSignals().install()  # first: a Ctrl-C while the rest is imported is recorded, not lost

from mindformers_sigma.launcher.main import main  # noqa: E402

sys.exit(main(sys.argv[1:], SIGNALS))
