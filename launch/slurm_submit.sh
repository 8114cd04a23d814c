#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch: multi-node GPU training, one process per node or per GPU.
#
#   launch/slurm_submit.sh [options] CONFIG WORKDIR [--config.a.b=value ...]
#   launch/slurm_submit.sh --nodes=4 --partition=h100 configs/tuna2_7b.py /shared/runs/7b
#
#   --nodes=N            nodes (default 1)
#   --gpus_per_node=G    GPUs per node (default 8)
#   --per=node|gpu       one process per node driving all its GPUs (default), or one per GPU
#   --job_name=NAME      SLURM job name (default: basename of WORKDIR)
#   --partition=P --account=A --time=T --qos=Q   passed to sbatch when given
#   --sbatch_arg=ARG     any other sbatch option (repeatable), e.g. --sbatch_arg=--reservation=r1
#   --dry_run            print the sbatch command and what every task would run (simulated SLURM env)
#
# Run it from the repository root on a login node; WORKDIR must be on a shared file system. Resubmitting on
# the same WORKDIR resumes from the latest checkpoint (the job also requeues itself at its time limit).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

nodes=1 gpus=8 per=node job_name="" dry_run=0
sbatch_args=()
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --partition=* | --account=* | --time=* | --qos=*) sbatch_args+=("$1") ;;
    --sbatch_arg=*) sbatch_args+=("${1#*=}") ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage_exit "${BASH_SOURCE[0]}" ;;
    *) die "unknown option $1 (launcher options come before CONFIG WORKDIR)" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || usage_exit "${BASH_SOURCE[0]}"
config="$1"
workdir="$2"
shift 2
case "${per}" in
  node) tasks_per_node=1 ;;
  gpu) tasks_per_node="${gpus}" ;;
  *) die "--per must be node or gpu, got '${per}'" ;;
esac
job_name="${job_name:-$(basename "${workdir}")}"
is_remote_path "${workdir}" || workdir="$(realpath -m "${workdir}")"  # tasks may start elsewhere

cmd=(sbatch --job-name="${job_name}" --nodes="${nodes}" --gpus-per-node="${gpus}"
  --ntasks-per-node="${tasks_per_node}" --chdir="${TUNA2_REPO}" --export="ALL,TUNA2_REPO=${TUNA2_REPO}"
  --output="${workdir}/logs/slurm-%j.out"
  "${sbatch_args[@]}" "${TUNA2_REPO}/launch/slurm_gpu.sbatch" "${config}" "${workdir}" "$@")
printf '%s\n' "$(quote_cmd "${cmd[@]}")"
if ((dry_run)); then
  # What the batch script does on the first node, with the env SLURM would give it.
  nodelist="node[001-$(printf '%03d' "${nodes}")]"
  env TUNA2_DRY_RUN=1 TUNA2_REPO="${TUNA2_REPO}" SLURM_JOB_ID=1000 SLURM_JOB_NODELIST="${nodelist}" \
    SLURM_JOB_NUM_NODES="${nodes}" SLURM_NTASKS_PER_NODE="${tasks_per_node}" SLURM_GPUS_ON_NODE="${gpus}" \
    bash "${TUNA2_REPO}/launch/slurm_gpu.sbatch" "${config}" "${workdir}" "$@"
  exit 0
fi
mkdir -p "${workdir}/logs"
"${cmd[@]}"
