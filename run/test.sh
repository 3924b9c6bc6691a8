#!/usr/bin/env bash
# Fresh-machine tests: set up .venv, then run the whole suite (slow end-to-end tests included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PANGU_SIGMA_EXTRAS="test,pangu-alpha" bash "$repo/run/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
