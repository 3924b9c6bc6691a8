"""Entry point of each rank: `python run/train.py ARGS` is `pangu-sigma train ARGS`.

Under `run/distributed_train.sh` the rank first moves into its own working folder and arranges to
stop when its parent does (mindformers_sigma/launcher/worker.py); the checkout is put on the
import path first, because that folder is not the checkout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindformers_sigma.launcher.worker import join_launch  # noqa: E402

if __name__ == "__main__":
    join_launch()
    from mindformers_sigma.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
