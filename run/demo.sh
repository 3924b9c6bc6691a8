#!/usr/bin/env bash
# Fresh-machine demo: set up .venv, build the real multi-domain demo corpus, tokenize and pack
# it (5% of each domain's documents held out for evaluation), then train the tiny PanGu-Σ config on CPU end to end, with metrics and checkpoints in
# output/demo (a rerun replaces the previous demo run: --overwrite). Extra arguments go to the
# trainer (e.g. --steps 300, or --resume auto to continue the previous run).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/run/setup_env.sh"
cd "$repo"
cli="$repo/.venv/bin/pangu-sigma"
config="$repo/ascend_configs/pangu_sigma_tiny_cpu.yaml"
raw="$repo/data/demo/raw"
prepared="$repo/data/demo/prepared"

"$cli" demo-corpus --out "$raw"
domains=()
for file in "$raw"/*.jsonl; do
  domains+=(--domain "$(basename "$file" .jsonl)=$file")
done
"$cli" prepare-data "${domains[@]}" --out "$prepared" --seq-length 128 --vocab-size 4096 --holdout 0.05
exec "$cli" train --config "$config" --data "$prepared" --out "$repo/output/demo" --overwrite "$@"
