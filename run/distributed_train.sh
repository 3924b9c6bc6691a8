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

# A rank (or msrun) failed: one line on stderr, exit code 1.
fail() {
  echo "distributed_train.sh: error: $*" >&2
  exit 1
}

# "rank R exited with code C (see LOG)"; a negative C (Python's way) or one above 128 (the
# shell's) is a signal.
describe_exit() {
  local rank="$1" code="$2" log="$3"
  if [ "$code" -lt 0 ]; then
    echo "rank $rank was killed by signal $((-code)) (see $log)"
  elif [ "$code" -gt 128 ]; then
    echo "rank $rank exited with code $code, killed by signal $((code - 128)) (see $log)"
  else
    echo "rank $rank exited with code $code (see $log)"
  fi
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

# Runs in the background while msrun (its pid in $state/msrun.pid) runs in the foreground:
# records which worker pid is which rank (from the MS_ROLE/RANK_ID msrun gives each child),
# follows the first local worker's log on stdout, and once msrun reports a failed worker
# (and has killed the others) stops the scheduler, which would otherwise wait for the dead
# workers: ~30 s after training started, up to --cluster_time_out (10 min) before.
watch_msrun() {
  local state="$1" first_rank="$2" local_workers="$3" msrun_log="$4"
  local msrun_pid pid env_text cmdline role rank seen=" " found=0 scans=0 tail_pid="" sched_pid="" stopped=0
  until [ -s "$state/msrun.pid" ]; do
    kill -0 "$$" 2>/dev/null || return 0
    sleep 0.05
  done
  msrun_pid="$(cat "$state/msrun.pid")"
  while kill -0 "$msrun_pid" 2>/dev/null; do
    scans=$((scans + 1))
    for pid in $(pgrep -P "$msrun_pid" || true); do
      [ "$found" -lt "$local_workers" ] || break
      case "$seen" in *" $pid "*) continue ;; esac
      # Until the child has exec'd, /proc shows msrun's own environment (no MS_ROLE).
      env_text="$(tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ")" || continue
      env_text=$'\n'"$env_text"$'\n'
      case "$env_text" in
        *$'\nMS_ROLE=MS_SCHED\n'*) role="sched" ;;
        *$'\nMS_ROLE=MS_WORKER\n'*) role="worker" ;;
        *) continue ;;
      esac
      seen+="$pid "
      # msrun's `tail -f worker_N.log` children have a worker's environment, not its script.
      cmdline="$(tr '\0' '\n' 2>/dev/null < "/proc/$pid/cmdline")" || continue
      case $'\n'"$cmdline"$'\n' in *$'\n'"$repo/run/train.py"$'\n'*) ;; *) continue ;; esac
      rank="${env_text#*$'\n'RANK_ID=}"
      rank="${rank%%$'\n'*}"
      if [ "$role" = "sched" ]; then
        sched_pid="$pid"
        continue
      fi
      echo "$pid $rank" >> "$state/workers"
      found=$((found + 1))
      if [ "$rank" = "$first_rank" ] && [ -z "$tail_pid" ]; then
        tail -n +1 -f --pid="$msrun_pid" "$log_dir/worker_$rank.log" &
        tail_pid="$!"
      fi
    done
    # No -q: grep must read to the end, or `tail` dies of SIGPIPE and pipefail says "no match".
    if [ "$stopped" -eq 0 ] &&
       tail -c 65536 "$msrun_log" | grep -E 'Worker process [0-9]+ exit with exception' > /dev/null; then
      stopped=1
      [ -z "$sched_pid" ] || kill "$sched_pid" 2>/dev/null || true
    fi
    # Scan often while workers start (one that fails in its first 0.1 s may be missed),
    # then once a second.
    if [ "$found" -lt "$local_workers" ] && [ "$scans" -lt 400 ]; then
      sleep 0.03
    else
      sleep 1
    fi
  done
  [ -z "$tail_pid" ] || wait "$tail_pid" || true
}

# Run msrun (the command in "$@") with its output in $log_dir/msrun.log; on failure say, in
# one line, which rank(s) failed, how, and where their log is.
run_msrun() {
  local first_rank="$1" local_workers="$2" msrun_log="$log_dir/msrun.log" rc=0 monitor line
  shift 2
  mkdir -p "$log_dir"
  state="$(mktemp -d)"  # global: the EXIT trap removes it
  trap 'rm -rf "$state"' EXIT
  trap 'interrupted=1' INT
  interrupted=0
  : > "$state/workers"
  watch_msrun "$state" "$first_rank" "$local_workers" "$msrun_log" &
  monitor="$!"
  (echo "$BASHPID" > "$state/msrun.pid"; exec "$@") > "$msrun_log" 2>&1 || rc="$?"
  wait "$monitor" || true
  if [ "$interrupted" -eq 1 ]; then
    echo "distributed_train.sh: interrupted; msrun stopped the workers (see $msrun_log)" >&2
    exit 130
  fi
  [ "$rc" -ne 0 ] || return 0
  local failures=() pid code rank missing
  # Local ranks the watcher never saw running: if only one, a failed pid it never saw is that rank.
  missing="$(awk -v first="$first_rank" -v n="$local_workers" \
    '{ seen[$2] = 1 } END { for (r = first; r < first + n; r++) if (!(r in seen)) print r }' "$state/workers")"
  while read -r pid code; do
    rank="$(awk -v pid="$pid" '$1 == pid { print $2 }' "$state/workers")"
    if [ -z "$rank" ]; then
      case "$missing" in *$'\n'*) ;; *) rank="$missing" ;; esac
    fi
    if [ -n "$rank" ]; then
      failures+=("$(describe_exit "$rank" "$code" "$log_dir/worker_$rank.log")")
    else
      failures+=("a worker (pid $pid, rank unknown) exited with code $code (see $log_dir/worker_*.log)")
    fi
  done < <(sed -nE 's/.*Worker process ([0-9]+) exit with exception\. Error code: (-?[0-9]+)\..*/\1 \2/p' "$msrun_log")
  if [ "${#failures[@]}" -gt 0 ]; then
    line="$(printf '%s; ' "${failures[@]}")"
    fail "${line%; }"
  elif grep -qE 'Scheduler process [0-9]+ exit with exception' "$msrun_log"; then
    fail "the msrun scheduler failed (see $log_dir/scheduler.log and $msrun_log)"
  fi
  fail "msrun exited with code $rc (see $msrun_log)"
}

# Print an msrun command with its environment, shell-quoted; run it unless --dry-run.
msrun_or_show() {
  local first_rank="$1" local_workers="$2"
  shift 2
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    run_msrun "$first_rank" "$local_workers" "$@"
  fi
}

case "$mode" in
  cpu)
    [ -n "$workers" ] && [ "$workers" -ge 1 ] || die "--cpu needs --workers N (N >= 1)"
    overrides=(--set parallel.mode=data_parallel --set "parallel.device_num=$workers"
               --set "parallel.data_parallel=$workers" --set context.device_target=CPU)
    "$python" -m mindformers_sigma check-launch --config "$config" "${overrides[@]}" --workers "$workers" >/dev/null
    msrun_or_show 0 "$workers" env PATH="$python_dir:$PATH" msrun --worker_num="$workers" --local_worker_num="$workers" \
      --master_addr=127.0.0.1 --master_port="$master_port" --log_dir="$log_dir" --join=True \
      "$repo/run/train.py" --config "$config" "${overrides[@]}" "${train_args[@]}"
    ;;
  msrun)
    total=$((devices * nnodes))
    "$python" -m mindformers_sigma check-launch --config "$config" --workers "$total" >/dev/null
    msrun_or_show "$((node_rank * devices))" "$devices" env PATH="$python_dir:$PATH" HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}" \
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
    ranks=()
    while read -r rank_id device_id rank_size; do
      cmd=(env RANK_TABLE_FILE="$rank_table" RANK_ID="$rank_id" DEVICE_ID="$device_id" RANK_SIZE="$rank_size"
           HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}"
           "$python" "$repo/run/train.py" --config "$config" "${train_args[@]}")
      if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "${cmd[@]}"
        printf '> %q 2>&1 &\n' "$log_dir/rank_$rank_id.log"
      else
        # In a subshell whose stderr is /dev/null: a rank killed by a signal makes bash print
        # "Killed ..." there, not on ours (the line after the loop says it).
        ("${cmd[@]}" > "$log_dir/rank_$rank_id.log" 2>&1; exit "$?") 2>/dev/null &
        pids+=("$!")
        ranks+=("$rank_id")
      fi
    done <<< "$local_ranks"
    failures=()
    for i in "${!pids[@]}"; do
      code=0
      wait "${pids[$i]}" || code="$?"
      [ "$code" -eq 0 ] || failures+=("$(describe_exit "${ranks[$i]}" "$code" "$log_dir/rank_${ranks[$i]}.log")")
    done
    if [ "${#failures[@]}" -gt 0 ]; then
      line="$(printf '%s; ' "${failures[@]}")"
      fail "${line%; }"
    fi
    ;;
esac
