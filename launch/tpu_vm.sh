#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice: create it (optional), sync this checkout, set up a venv
# (optional) and run the same launch/host.sh command on all workers, with one log per worker.
#
#   launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator_type=v5litepod-16 [options] \
#     CONFIG WORKDIR [overrides]
#
#   --project=P          gcloud project (default: gcloud's)
#   --create             create the TPU VM when it does not exist (--version, --spot apply)
#   --version=V          TPU runtime (default by family: v2-alpha-tpuv5-lite, v2-alpha-tpuv6e, ...)
#   --spot               create a Spot TPU VM (preemptible; relaunch with --create --setup to continue)
#   --setup              install Python 3.12 + a venv from requirements.txt on every worker (first run)
#   --nosync             do not copy this checkout to the workers (by default every run syncs it)
#   --repo_dir=D         checkout on the workers, relative to $HOME (default tuna2_jax)
#   --env=K=V            exported on every worker before the trainer (repeatable: LIBTPU_INIT_ARGS, ...)
#   --run_name=N         names the local log directory (default: basename of WORKDIR)
#   --log_dir=D          local directory for the per-worker logs (default runs/launch/<run_name>)
#   --dry_run            print every command (create, sync, setup, run) and run nothing
#
# WORKDIR must be shared by all workers (a gcsfuse mount of a bucket, /gcs/runs/x, see launch/README.md):
# Orbax writes one checkpoint from all hosts, and the trainer resumes from its latest step when relaunched on
# it. Overrides pass through unchanged.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  usage_exit "${BASH_SOURCE[0]}"
}

name="" zone="" project="" accelerator="" version="" create=0 spot=0 setup=0 sync=1 dry_run=0
repo_dir="tuna2_jax" run_name="" log_dir=""
envs=()
invocation="$(quote_cmd "$0" "$@")"
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --setup) setup=1 ;;
    --nosync) sync=0 ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --env=*) envs+=("${1#*=}") ;;
    --run_name=*) run_name="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (launcher options come before CONFIG WORKDIR)" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || usage
[[ -n "${name}" && -n "${zone}" && -n "${accelerator}" ]] \
  || die "--name, --zone and --accelerator_type are required"
config="$1"
workdir="$2"
shift 2
python="$(tuna2_python)"

hosts="$("${python}" -m launch.slices "${accelerator}" --field=hosts)"
chips="$("${python}" -m launch.slices "${accelerator}" --field=chips_per_host)"
if [[ -z "${version}" ]]; then
  case "${accelerator}" in
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi
run_name="${run_name:-$(basename "${workdir}")}"
log_dir="${log_dir:-runs/launch/${run_name}}"
if [[ "${hosts}" -gt 1 && "${workdir}" != gs://* && "${workdir}" != /gcs/* ]]; then
  printf 'note: WORKDIR %s must be shared by the %s workers (a gcsfuse mount or NFS)\n' "${workdir}" \
    "${hosts}" >&2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="${zone}")
[[ -z "${project}" ]] || where+=(--project="${project}")

# Prints the command (dry run) or prints and runs it.
run() {
  printf '%s\n' "$(quote_cmd "$@")"
  if ((dry_run == 0)); then
    "$@"
  fi
}

printf '# %s: %s workers x %s chips (%s), run %s, logs in %s/<worker>.log\n' "${name}" "${hosts}" "${chips}" \
  "${accelerator}" "${run_name}" "${log_dir}"

if ((create)); then
  create_cmd=("${gcloud_tpu[@]}" create "${name}" "${where[@]}" --accelerator-type="${accelerator}"
    --version="${version}")
  ((spot == 0)) || create_cmd+=(--spot)
  if ((dry_run)); then
    printf '# when %s does not exist yet:\n' "${name}"
    run "${create_cmd[@]}"
  elif ! "${gcloud_tpu[@]}" describe "${name}" "${where[@]}" >/dev/null 2>&1; then
    run "${create_cmd[@]}"
  fi
fi

if ((sync)); then
  # This checkout as it is (tracked + untracked, minus .gitignore'd runs/ and .venv/), on every worker.
  tarball="/tmp/tuna2_src_${run_name//[^A-Za-z0-9_-]/_}.tgz"
  repo_q="$(quote_cmd "${TUNA2_REPO}")"
  printf '%s\n' "git -C ${repo_q} ls-files -z --cached --others --exclude-standard \
| tar -C ${repo_q} --null -T - -czf $(quote_cmd "${tarball}")"
  if ((dry_run == 0)); then
    git -C "${TUNA2_REPO}" ls-files -z --cached --others --exclude-standard \
      | tar -C "${TUNA2_REPO}" --null -T - -czf "${tarball}"
  fi
  run "${gcloud_tpu[@]}" scp "${tarball}" "${name}:tuna2_src.tgz" --worker=all "${where[@]}"
  run "${gcloud_tpu[@]}" ssh "${name}" --worker=all "${where[@]}" \
    --command="mkdir -p $(quote_cmd "${repo_dir}") && tar -xzf tuna2_src.tgz -C $(quote_cmd "${repo_dir}")"
fi

if ((setup)); then
  # TPU VM images ship Python 3.10; uv brings a standalone 3.12 (JAX 0.11 needs it) and installs the pins.
  setup_cmd="set -e; cd $(quote_cmd "${repo_dir}"); python3 -m pip install -q --user uv"
  setup_cmd+="; ~/.local/bin/uv venv -q --allow-existing --python 3.12 .venv"
  setup_cmd+="; ~/.local/bin/uv pip install -q --python .venv/bin/python"
  setup_cmd+=" -r requirements.txt -r requirements-tpu.txt"
  setup_cmd+="; ~/.local/bin/uv pip install -q --python .venv/bin/python --no-deps -e ."
  setup_cmd+="; .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
  run "${gcloud_tpu[@]}" ssh "${name}" --worker=all "${where[@]}" --command="${setup_cmd}"
fi

# The one command every worker runs.
remote="cd $(quote_cmd "${repo_dir}") && env TUNA2_LAUNCHER=tpu_vm"
for kv in "${envs[@]}"; do
  remote+=" $(quote_cmd "${kv}")"
done
remote+=" bash launch/host.sh $(quote_cmd "${config}" "${workdir}" "$@")"
if ((dry_run == 0)); then
  mkdir -p "${log_dir}"
  printf '%s\n%s\n' "cd $(quote_cmd "$(pwd)")" "${invocation}" >"${log_dir}/command.sh"
fi
printf '# every worker (%s of them) runs: %s\n' "${hosts}" "${remote}"
run "${gcloud_tpu[@]}" ssh "${name}" --worker=all "${where[@]}" --output-directory="${log_dir}" \
  --command="${remote}"
