#!/usr/bin/env bash
# The one command every host of a multi-host job runs: TPU VM workers (tpu_vm.sh), GKE pods (gke/jobset.py)
# and SLURM tasks (slurm_gpu.sbatch) all call it with identical arguments.
#
#   launch/host.sh CONFIG WORKDIR [--config.a.b=value ...]
#
# It finds this host's rank (JAX_PROCESS_ID, SLURM_PROCID, JOB_COMPLETION_INDEX, TPU_WORKER_ID or the TPU
# VM metadata), makes sure jax.distributed can find its peers, tees the output to a per-host log, records the
# launch on rank 0 and execs the trainer: as the container's or the task's main process it gets SIGTERM itself
# and saves at the next step boundary before the host goes away.
#
# Env: TUNA2_PYTHON (interpreter), TUNA2_LOG_DIR (default WORKDIR/logs, or ~/tuna2_logs/<run> for gs://),
# TUNA2_LAUNCHER (recorded in the history), TUNA2_DRY_RUN=1 (print the rank, env and command; run nothing).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  usage_exit "${BASH_SOURCE[0]}"
fi
config="$1"
workdir="$2"
shift 2
python="$(tuna2_python)"

tpu_metadata() {
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

# A Cloud TPU VM reached over ssh has no jax.distributed env (GKE injects TPU_WORKER_ID and
# TPU_WORKER_HOSTNAMES). Export the same two from the VM metadata so the trainer takes the one auto-detected
# path on both. worker-network-endpoints is "name:id:ip,..." (older) or "host,..." (newer).
if [[ -z "${SLURM_PROCID:-}" && -z "${JOB_COMPLETION_INDEX:-}" && -z "${TPU_WORKER_HOSTNAMES:-}" ]] \
  && { compgen -G '/dev/accel*' || compgen -G '/dev/vfio/[0-9]*'; } >/dev/null; then
  if worker_id="$(tpu_metadata agent-worker-number)"; then
    endpoints="$(tpu_metadata worker-network-endpoints)"
    hosts=()
    IFS=',' read -ra entries <<<"${endpoints}"
    for entry in "${entries[@]}"; do
      hosts+=("${entry##*:}")
    done
    TPU_WORKER_HOSTNAMES="$(IFS=','; printf '%s' "${hosts[*]}")"
    export TPU_WORKER_ID="${worker_id}" TPU_WORKER_HOSTNAMES
  fi
fi
rank="${JAX_PROCESS_ID:-${SLURM_PROCID:-${JOB_COMPLETION_INDEX:-${TPU_WORKER_ID:-0}}}}"

if is_remote_path "${workdir}"; then
  log_dir="${TUNA2_LOG_DIR:-${HOME}/tuna2_logs/$(basename "${workdir}")}"
else
  log_dir="${TUNA2_LOG_DIR:-${workdir}/logs}"
fi
cmd=("${python}" -m tuna2_jax.train --config="${config}" --workdir="${workdir}" "$@")
# GKE GPU pods carry the coordinator in the env; jax reads JAX_COORDINATOR_ADDRESS itself but not the count
# and the id, so they become the trainer's flags.
if [[ -n "${JAX_COORDINATOR_ADDRESS:-}" && -n "${JAX_NUM_PROCESSES:-}" && -n "${JAX_PROCESS_ID:-}" ]]; then
  cmd+=(--coordinator_address="${JAX_COORDINATOR_ADDRESS}" --num_processes="${JAX_NUM_PROCESSES}"
    --process_id="${JAX_PROCESS_ID}")
fi

if [[ "${TUNA2_DRY_RUN:-0}" == 1 ]]; then
  printf 'rank=%s log=%s\n' "${rank}" "${log_dir}/host_${rank}.log"
  env | grep -E '^(JAX_|XLA_FLAGS|NCCL_|TPU_WORKER|SLURM_PROCID|JOB_COMPLETION_INDEX)' | sort || true
  printf 'exec %s\n' "$(quote_cmd "${cmd[@]}")"
  exit 0
fi

if ((rank == 0)); then
  record_launch "${TUNA2_LAUNCHER:-host}" "${workdir}" "$(quote_cmd "$0" "${config}" "${workdir}" "$@")" \
    --config="${config}" "$@"
fi
mkdir -p "${log_dir}"
exec > >(tee -a "${log_dir}/host_${rank}.log") 2>&1
printf 'host.sh: rank %s on %s: %s\n' "${rank}" "$(hostname)" "$(quote_cmd "${cmd[@]}")"
exec "${cmd[@]}"
