#!/usr/bin/env bash
# Launch PanGu-Σ training on several devices.
#
#   Ascend, rank table (one process per local NPU, RANK_ID/DEVICE_ID set, a log per rank):
#     bash run/distributed_train.sh --rank-table hccl_8p.json [--server-id IP] [--devices 8] CONFIG [-- TRAIN_ARGS]
#   Ascend/GPU, msrun (no rank table; multi-node with --nnodes/--node_rank/--master_addr):
#     bash run/distributed_train.sh --msrun [--devices 8] [--nnodes 1 --node_rank 0 --master_addr IP] CONFIG
#   CPU, data parallel over msrun workers on 127.0.0.1 (mccl backend):
#     bash run/distributed_train.sh --cpu --workers 2 CONFIG [-- TRAIN_ARGS]
#
# Before anything starts, the config's parallel.device_num is checked against the rank table
# (or the worker count). --dry-run prints exactly what would run, and runs nothing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
  python="$repo/.venv/bin/python"
fi

# msrun starts workers with the `python` on PATH: make it this one.
python_dir="$(dirname "$(command -v "$python")")"

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "distributed_train.sh: error: $*" >&2
  exit 2
}

mode=""
workers=""
devices=8
rank_table="${RANK_TABLE_FILE:-}"
server_id=""
nnodes=1
node_rank=0
master_addr="127.0.0.1"
master_port=8118
log_dir="output/logs"
dry_run=0
config=""
train_args=()

need_value() {
  [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --cpu) mode="cpu"; shift ;;
    --msrun) mode="msrun"; shift ;;
    --workers) need_value "$@"; workers="$2"; shift 2 ;;
    --devices) need_value "$@"; devices="$2"; shift 2 ;;
    --rank-table) need_value "$@"; rank_table="$2"; mode="${mode:-ranktable}"; shift 2 ;;
    --server-id) need_value "$@"; server_id="$2"; shift 2 ;;
    --nnodes) need_value "$@"; nnodes="$2"; shift 2 ;;
    --node_rank|--node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --master_addr|--master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master_port|--master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --log-dir) need_value "$@"; log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$config" ] || die "two configs given: $config and $1"; config="$1"; shift ;;
  esac
done

[ -n "$config" ] || die "no CONFIG given (see --help)"
[ -f "$config" ] || die "config $config: no such file"
if [ -z "$mode" ]; then
  [ -n "$rank_table" ] && mode="ranktable" || mode="msrun"
fi
for number in "$devices" "$nnodes" "$node_rank" "$master_port" ${workers:+"$workers"}; do
  case "$number" in ''|*[!0-9]*) die "expected a non-negative integer, got '$number'" ;; esac
done

# Print a command with its environment, shell-quoted; run it unless --dry-run.
run_or_show() {
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

case "$mode" in
  cpu)
    [ -n "$workers" ] && [ "$workers" -ge 1 ] || die "--cpu needs --workers N (N >= 1)"
    overrides=(--set parallel.mode=data_parallel --set "parallel.device_num=$workers"
               --set "parallel.data_parallel=$workers" --set context.device_target=CPU)
    "$python" -m mindformers_sigma check-launch --config "$config" "${overrides[@]}" --workers "$workers" >/dev/null
    run_or_show env PATH="$python_dir:$PATH" msrun --worker_num="$workers" --local_worker_num="$workers" \
      --master_addr=127.0.0.1 --master_port="$master_port" --log_dir="$log_dir" --join=True \
      "$repo/run/train.py" --config "$config" "${overrides[@]}" "${train_args[@]}"
    ;;
  msrun)
    total=$((devices * nnodes))
    "$python" -m mindformers_sigma check-launch --config "$config" --workers "$total" >/dev/null
    run_or_show env PATH="$python_dir:$PATH" HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}" \
      msrun --worker_num="$total" --local_worker_num="$devices" --master_addr="$master_addr" \
      --master_port="$master_port" --node_rank="$node_rank" --log_dir="$log_dir" --join=True \
      "$repo/run/train.py" --config "$config" "${train_args[@]}"
    ;;
  ranktable)
    [ -f "$rank_table" ] || die "rank table $rank_table: no such file"
    check=("$python" -m mindformers_sigma check-launch --config "$config" --rank-table "$rank_table")
    [ -z "$server_id" ] || check+=(--server-id "$server_id")
    local_ranks="$("${check[@]}")"
    count="$(printf '%s\n' "$local_ranks" | grep -c .)"
    [ "$count" -eq "$devices" ] || die "rank table $rank_table lists $count devices for this server, --devices is $devices"
    [ "$dry_run" -eq 1 ] || mkdir -p "$log_dir"
    pids=()
    while read -r rank_id device_id rank_size; do
      cmd=(env RANK_TABLE_FILE="$rank_table" RANK_ID="$rank_id" DEVICE_ID="$device_id" RANK_SIZE="$rank_size"
           HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}"
           "$python" "$repo/run/train.py" --config "$config" "${train_args[@]}")
      if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "${cmd[@]}"
        printf '> %q 2>&1 &\n' "$log_dir/rank_$rank_id.log"
      else
        "${cmd[@]}" > "$log_dir/rank_$rank_id.log" 2>&1 &
        pids+=("$!")
      fi
    done <<< "$local_ranks"
    status=0
    for pid in "${pids[@]}"; do
      wait "$pid" || status=1
    done
    [ "$status" -eq 0 ] || die "a rank failed; see $log_dir/rank_*.log"
    ;;
esac
