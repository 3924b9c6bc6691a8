"""The rank's side of a launch (`run/train.py` calls :func:`join_launch` before anything else).

Under `run/distributed_train.sh` each rank gets its own working folder, because MindSpore writes
per-process files (compiled graphs, kernel caches, ``rank_*/`` dumps) into the working directory,
and dies with its parent, so that a launcher or msrun killed with SIGKILL leaves no rank behind.
The launcher turns every path of the command line into an absolute one first, so the change of
folder is safe.
"""

from __future__ import annotations

import os

from mindformers_sigma.launcher.processes import die_with_parent

# Set by the launcher for every process it starts: the folder holding one working folder per rank.
RANK_FOLDERS_ENV = "PANGU_SIGMA_RANK_FOLDERS"


def rank_folder_name(environ: "os._Environ[str] | dict") -> str:
    """``scheduler`` for msrun's scheduler process, ``rank_N`` for rank N."""
    if environ.get("MS_ROLE") == "MS_SCHED":
        return "scheduler"
    return f"rank_{environ.get('RANK_ID', 'unknown')}"


def join_launch() -> None:
    """Enter this rank's working folder and stop with the parent process; nothing outside a launch."""
    root = os.environ.get(RANK_FOLDERS_ENV)
    if not root:
        return
    die_with_parent()
    folder = os.path.join(root, rank_folder_name(os.environ))
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
