# Helpers shared by the launch/*.sh scripts; sourced, never run.
# shellcheck shell=bash

# The repository root, importable from anywhere (configs/*.py import `configs.common`).
TUNA2_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${TUNA2_REPO}${PYTHONPATH:+:${PYTHONPATH}}"

# The interpreter that runs the trainer: $TUNA2_PYTHON, else the repo's .venv, else python3.
tuna2_python() {
  if [[ -n "${TUNA2_PYTHON:-}" ]]; then
    printf '%s\n' "${TUNA2_PYTHON}"
  elif [[ -x "${TUNA2_REPO}/.venv/bin/python" ]]; then
    printf '%s\n' "${TUNA2_REPO}/.venv/bin/python"
  else
    printf '%s\n' python3
  fi
}

# One shell-quoted line for a command (single quotes where needed, like Python's shlex.join): what dry runs
# print and what the workdir records; pasting it into a shell runs the same argv.
quote_cmd() {
  local arg q="'"
  local out=()
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("${arg}")
    else
      out+=("${q}${arg//${q}/${q}\\${q}${q}}${q}")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# True for object-store paths (gs://...), which only the trainer's own I/O can write.
is_remote_path() {
  [[ "$1" == *://* ]]
}

# Fails with the usage text when an option needs a value it did not get.
die() {
  printf 'error: %s\n' "$1" >&2
  exit 2
}

# record_launch LAUNCHER WORKDIR INVOCATION [TRAIN_ARGS...]: writes WORKDIR/launch/{command.sh, config.json,
# history.jsonl}. Never fails the launch: the trainer reports bad overrides itself, on every host.
record_launch() {
  local launcher="$1" workdir="$2" invocation="$3"
  shift 3
  "$(tuna2_python)" -m launch.record --launcher="${launcher}" --workdir="${workdir}" \
    --invocation="${invocation}" -- "$@" \
    || printf 'warning: could not record the launch in %s\n' "${workdir}" >&2
}

# Prints a script's header comment (its usage text) and exits 2.
usage_exit() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
  exit 2
}
