"""`python hccl_tools/plan_cluster.py --help`: the rank-table 'plan' tool (same as `pangu-sigma rank-table plan`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from mindformers_sigma.rank_table.cli import main_for  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_for("plan"))
