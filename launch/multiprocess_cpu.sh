#!/usr/bin/env bash
# N training processes on this machine, each with fake CPU devices, joined by jax.distributed through a
# coordinator on localhost: the cheapest way to run the multi-host code paths (global arrays, per-process
# data shards, Orbax multi-host save and restore).
#
#   launch/multiprocess_cpu.sh N CONFIG WORKDIR [--config.a.b=value ...]
#   TUNA2_CPU_DEVICES=4 launch/multiprocess_cpu.sh 2 configs/tuna2_debug.py /tmp/mp --config.train.steps=3
#
# TUNA2_CPU_DEVICES: fake devices per process (default 2). Overrides pass through unchanged. Process 0 prints
# to the terminal; every process logs to WORKDIR/logs/process_<i>.log. SIGTERM / Ctrl-C are forwarded to all
# processes (they save at the next step boundary); if one process fails the others are stopped. Rerunning the
# same command resumes from the latest checkpoint.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -lt 3 || "$1" == -h || "$1" == --help ]]; then
  usage_exit "${BASH_SOURCE[0]}"
fi
num_processes="$1"
config="$2"
workdir="$3"
shift 3
[[ "${num_processes}" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '${num_processes}'"
devices="${TUNA2_CPU_DEVICES:-2}"
python="$(tuna2_python)"
invocation="$(quote_cmd "$0" "${num_processes}" "${config}" "${workdir}" "$@")"

port="$("${python}" -c 'import portpicker; print(portpicker.pick_unused_port())')"
logs="${workdir}/logs"
mkdir -p "${logs}"
record_launch multiprocess_cpu "${workdir}" "${invocation}" --config="${config}" "$@"

# Where this launch starts in process 0's log (the terminal shows only this launch's part).
start_bytes="$(stat -c %s "${logs}/process_0.log" 2>/dev/null || echo 0)"
# Gloo gives the first collective 30 s to find its peers. A persistent compile cache lets one process skip the
# compile the others still do; on a busy machine that skew passes 30 s and the run fails: no cache here.
unset JAX_COMPILATION_CACHE_DIR
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "${pid}" 2>/dev/null || true
  done
}
# Preemption semantics: pass the signal on and wait for the processes to save and exit.
trap 'printf "multiprocess_cpu: forwarding SIGTERM to %d processes\n" "${#pids[@]}" >&2; stop_all' TERM INT

for ((i = 0; i < num_processes; i++)); do
  log="${logs}/process_${i}.log"
  cmd=("${python}" -m tuna2_jax.train --config="${config}" --workdir="${workdir}"
    --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" --process_id="${i}" "$@")
  # Appended: a relaunch keeps the earlier attempts' logs above its own.
  printf 'process %d: %s\n' "${i}" "$(quote_cmd "${cmd[@]}")" >>"${log}"
  # The device count goes last so it wins over any inherited XLA_FLAGS setting.
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "${cmd[@]}" >>"${log}" 2>&1 &
  pids+=("$!")
done
printf 'multiprocess_cpu: %d processes x %d CPU devices, coordinator 127.0.0.1:%s, logs in %s\n' \
  "${num_processes}" "${devices}" "${port}" "${logs}"
tail -c "+$((start_bytes + 1))" -f "${logs}/process_0.log" --pid="${pids[0]}" &
tail_pid=$!

# Wait for all; the first failure stops the rest (they would block in a collective until a timeout).
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  rc=0
  done_pid=""
  wait -n -p done_pid "${running[@]}" || rc=$?
  # A trapped signal interrupts wait and leaves done_pid unset.
  if [[ -z "${done_pid:-}" ]]; then
    continue  # interrupted by the trap: keep waiting while the processes save and exit
  fi
  left=()
  for pid in "${running[@]}"; do
    [[ "${pid}" == "${done_pid}" ]] || left+=("${pid}")
  done
  running=("${left[@]}")
  if ((rc != 0 && status == 0)); then
    status=${rc}
    for ((i = 0; i < ${#pids[@]}; i++)); do
      if [[ "${pids[i]}" == "${done_pid}" ]]; then
        printf 'multiprocess_cpu: process %d exited with %d; last lines of its log:\n' "${i}" "${rc}" >&2
        tail -n 30 "${logs}/process_${i}.log" >&2
      fi
    done
    stop_all
  fi
done
wait "${tail_pid}" 2>/dev/null || true
exit "${status}"
