"""`python -m mindformers_sigma.launcher ARGS`: what run/distributed_train.sh runs."""

import sys

from mindformers_sigma.launcher.main import main

sys.exit(main(sys.argv[1:]))
