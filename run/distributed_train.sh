#!/usr/bin/env bash
# Launch PanGu-Σ training on several devices or nodes; `--help` lists every option.
#
#   bash run/distributed_train.sh --rank-table hccl_8p.json [--server-id IP] CONFIG [-- TRAIN_ARGS]
#   bash run/distributed_train.sh --msrun [--devices 8] [--nnodes N --node-rank R --master-addr IP] CONFIG [-- TRAIN_ARGS]
#   bash run/distributed_train.sh --cpu --workers 2 CONFIG [-- TRAIN_ARGS]
#
# This script only chooses the Python interpreter for the ranks: PYTHON if set, else the activated
# virtual or conda environment, else the checkout's .venv, else python3 on PATH. The launcher
# (mindformers_sigma/launcher/) checks the launch, prints the plan (--dry-run: prints it only),
# starts the ranks and stops them all on the first failure or on Ctrl-C/SIGTERM.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"
  chosen_by="PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  python="$VIRTUAL_ENV/bin/python"
  chosen_by="the activated environment $VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  python="$CONDA_PREFIX/bin/python"
  chosen_by="the activated conda environment $CONDA_PREFIX"
elif [ -x "$repo/.venv/bin/python" ]; then
  python="$repo/.venv/bin/python"
  chosen_by="the checkout's .venv"
else
  python="$(command -v python3 || true)"
  chosen_by="python3 on PATH"
fi
if [ -z "$python" ] || ! command -v "$python" > /dev/null; then
  echo "distributed_train.sh: error: no Python interpreter found (${python:-python3}); run 'bash run/setup_env.sh' or set PYTHON" >&2
  exit 2
fi
case "$python" in
  /*) ;;
  */*) python="$PWD/$python" ;;
  *) python="$(command -v "$python")" ;;
esac

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 8))' > /dev/null 2>&1; then
  echo "distributed_train.sh: error: $python ($chosen_by) is not a Python 3.8+ interpreter; set PYTHON to one" >&2
  exit 2
fi

export PANGU_SIGMA_LAUNCH_PYTHON="$python" PANGU_SIGMA_LAUNCH_PYTHON_FROM="$chosen_by"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m mindformers_sigma.launcher "$@"
