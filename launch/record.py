"""Records a launch in its workdir: the command that reproduces it, the resolved config, a history line.

  python -m launch.record --workdir=runs/x --launcher=local --invocation="launch/local.sh C runs/x" \
      -- --config=configs/tuna2_tiny.py --config.optim.lr=3e-4

writes (under WORKDIR/launch/, gs:// included where etils can write it):
  command.sh      the last launch: `cd` to where it ran, then the launcher's own command line; rerunning it
                  relaunches on the same workdir, which resumes from the latest checkpoint
  config.json     the config with the overrides applied, resolved exactly as the trainer's flags do
  history.jsonl   one line per launch: time, launcher, host, git commit, the trainer's arguments, the env that
                  shapes a run (XLA_FLAGS, JAX_*, NCCL_*, SLURM_JOB_ID, ...)
The trainer itself writes WORKDIR/config.json again when it starts; this copy exists before any compile and
fails fast (locally, in a dry run or a sweep) on an override that names no field.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys

from absl import app, flags
from etils import epath
from ml_collections import config_flags

# Environment variables that change what a run computes or how it communicates.
_ENV_PATTERN = re.compile(r"^(XLA_FLAGS|LIBTPU_INIT_ARGS|JAX_\w+|NCCL_\w+|TPU_\w+|SLURM_JOB_ID|SLURM_NNODES"
                          r"|SLURM_NTASKS|JOB_COMPLETION_INDEX|JOBSET_NAME|CUDA_VISIBLE_DEVICES|TUNA2_\w+)$")


def config_args(train_args: list[str]) -> list[str]:
  """The `--config=...` / `--config.a.b=v` arguments of a trainer command line (space form included)."""
  out, i = [], 0
  while i < len(train_args):
    arg = train_args[i]
    if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
      out += train_args[i:i + 2]
      i += 2
      continue
    if arg.startswith("--config=") or arg.startswith("--config."):
      out.append(arg)
    i += 1
  return out


def resolve_config(train_args: list[str]):
  """The ConfigDict the trainer will see for these arguments (same flag machinery, fresh flag values)."""
  argv = ["record"] + config_args(train_args)
  values = flags.FlagValues()
  # The overrides are read from sys_argv (not FlagValues parsing): pass this argv, not the process's.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  if values.config is None:
    raise ValueError("no --config=... among the trainer arguments")
  return values.config


def git_commit(repo: str) -> str:
  """`<sha>` or `<sha>+dirty`; '' outside a git checkout."""
  try:
    sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""
  return sha + ("+dirty" if dirty else "")


def record(workdir: str, *, launcher: str, invocation: str, train_args: list[str]) -> epath.Path:
  """Writes command.sh, config.json and a history line under WORKDIR/launch; returns that directory."""
  config = resolve_config(train_args)
  out = epath.Path(workdir) / "launch"
  out.mkdir(parents=True, exist_ok=True)
  now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = git_commit(repo)
  (out / "command.sh").write_text(
      "#!/usr/bin/env bash\n"
      f"# Last launch of this workdir ({launcher}, {now}, git {commit or 'unknown'}).\n"
      "# Rerun it to relaunch: the trainer resumes from the latest checkpoint in the workdir.\n"
      f"cd {shlex.quote(os.getcwd())}\n{invocation}\n")
  (out / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  line = dict(time=now, launcher=launcher, host=socket.gethostname(), cwd=os.getcwd(), git=commit,
              invocation=invocation, train_args=train_args,
              env={k: v for k, v in sorted(os.environ.items()) if _ENV_PATTERN.match(k)})
  history = out / "history.jsonl"
  previous = history.read_text() if history.exists() else ""
  # Object stores have no append: rewrite the whole (short) file.
  history.write_text(previous + json.dumps(line) + "\n")
  return out


def main(argv: list[str]) -> None:
  train_args = argv[1:]
  f = flags.FLAGS
  if f.check_only:
    print(resolve_config(train_args))
    return
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  out = record(f.workdir, launcher=f.launcher, invocation=f.invocation, train_args=train_args)
  print(f"recorded the launch in {out}", file=sys.stderr)


if __name__ == "__main__":
  # Defined here, not at import: launch.sweep imports this module and has flags of its own.
  flags.DEFINE_string("workdir", None, "The run's workdir (local path or gs://).")
  flags.DEFINE_string("launcher", "", "Which launcher started the run (local, tpu_vm, ...).")
  flags.DEFINE_string("invocation", "", "The launcher's command line, shell-quoted.")
  flags.DEFINE_bool("check_only", False, "Resolve the config and print it; write nothing.")
  app.run(main)
