#!/usr/bin/env bash
# Fresh-machine demo: set up .venv, then train the tiny PanGu-Σ config on CPU end to end.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/run/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/pangu-sigma" train --config "$repo/ascend_configs/pangu_sigma_tiny_cpu.yaml" "$@"
