#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install the package with its pinned dependencies.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PANGU_SIGMA_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# PANGU_SIGMA_EXTRAS: the package's extras to install (run/test.sh adds pangu-alpha)
"$venv/bin/python" -m pip install --quiet -e "${repo}[${PANGU_SIGMA_EXTRAS:-test}]"
echo "environment ready: $venv"
