"""`python -m mindformers_sigma` is the same as the `pangu-sigma` command."""

import sys

from mindformers_sigma.cli import main

sys.exit(main())
