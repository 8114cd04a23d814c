#!/usr/bin/env bash
# One training process on this machine (CPU, one GPU or a single-host TPU VM).
#
#   launch/local.sh CONFIG WORKDIR [--config.a.b=value ...]
#   launch/local.sh configs/tuna2_tiny.py runs/tiny --config.optim.lr=3e-4
#
# Overrides pass through unchanged. Records the launch in WORKDIR/launch/ (command.sh, config.json,
# history.jsonl), tees the output to WORKDIR/logs/local.log and execs the trainer, so SIGTERM / Ctrl-C reach
# it directly: it saves at the next step boundary. Rerunning the same command resumes from the latest
# checkpoint.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  usage_exit "${BASH_SOURCE[0]}"
fi
config="$1"
workdir="$2"
shift 2
invocation="$(quote_cmd "$0" "${config}" "${workdir}" "$@")"
python="$(tuna2_python)"

record_launch local "${workdir}" "${invocation}" --config="${config}" "$@"
if ! is_remote_path "${workdir}"; then
  mkdir -p "${workdir}/logs"
  exec > >(tee -a "${workdir}/logs/local.log") 2>&1
fi
exec "${python}" -m tuna2_jax.train --config="${config}" --workdir="${workdir}" "$@"
