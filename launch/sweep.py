"""Expands a sweep file into runs, launches or submits them, and summarises their final metrics.

  python -m launch.sweep --sweep=configs/sweeps/lr_flow.py --launcher=local --root=runs/sweeps
  python -m launch.sweep --sweep=configs/sweeps/lr_flow.py --launcher=gke --root=gs://b/sweeps \
      --launcher_args="--image=IMG --accelerator=v5litepod-16" --dry_run
  python -m launch.sweep --sweep=configs/sweeps/lr_flow.py --root=runs/sweeps --summarize --metric=loss

A sweep file (configs/sweeps/<name>.py) has CONFIG (a config path, optionally with ":arg") and `sweep()`
yielding override dicts {"optim.lr": 3e-4, ...}; a "config" key replaces CONFIG for that run. Run i gets the
name <sweep>-<i> plus its values and the workdir ROOT/<sweep>/<i>_<values>; overrides reach the launcher as
--config.<key>=<value> after the launcher's own arguments, unchanged. Every run's config is resolved locally
first, so a misspelt field fails before anything is submitted. Relaunching a sweep resumes each run.
The summary (markdown + CSV in ROOT/<sweep>/) has one row per run: its overrides and the last value of each
metric in its metrics.jsonl, sorted by --metric.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags, logging
from etils import epath

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # sweep files import configs.sweeps.grid
  sys.path.insert(0, _REPO)

from launch import record  # noqa: E402

LAUNCHERS = ("local", "tpu_vm", "gke", "slurm")

_SWEEP = flags.DEFINE_string("sweep", None, "Path of a configs/sweeps/<name>.py file.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", LAUNCHERS, "How each run is started.")
_ROOT = flags.DEFINE_string("root", "runs/sweeps", "Workdirs go under ROOT/<sweep>/ (gs:// for clusters).")
_LAUNCHER_ARGS = flags.DEFINE_string("launcher_args", "", "Extra launcher options, shell-quoted, e.g. "
                                     "'--name=pod1 --zone=us-east5-b --accelerator_type=v5litepod-16'.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each run's launch (cluster launchers print theirs).")
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "Only collect the runs' final metrics into a table.")
_METRIC = flags.DEFINE_string("metric", "loss", "The summary is sorted by this metric.")
_MODE = flags.DEFINE_enum("mode", "min", ("min", "max"), "Best first: smallest (min) or largest (max).")
_COLUMNS = flags.DEFINE_list("columns", ["loss", "text_loss", "flow_loss"], "Metrics shown besides --metric.")
_ONLY = flags.DEFINE_list("only", [], "Run only these run indices (e.g. 0,3).")


@dataclasses.dataclass(frozen=True)
class Run:
  index: int
  name: str             # unique inside the sweep; also the GKE / SLURM job name
  workdir: str
  config: str
  overrides: dict[str, Any]

  def config_args(self) -> list[str]:
    """The trainer's config arguments: --config=... then one --config.<key>=<value> per override."""
    overrides = [f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()]
    return [f"--config={self.config}", *overrides]


def format_value(v: Any) -> str:
  """A value as ml_collections' command-line parser reads it (tuples as '(1, 2)', floats via repr)."""
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(format_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return repr(v) if isinstance(v, float) else str(v)


def load_sweep(path: str):
  """Imports a sweep file by path (it need not be a package module)."""
  file = path.partition(":")[0]
  spec = importlib.util.spec_from_file_location(f"sweep_{os.path.basename(file)[:-3]}", file)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"--sweep={path}: no such Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep") or not hasattr(module, "CONFIG"):
    raise ValueError(f"{file} must define CONFIG and sweep()")
  return module


def _short(values: Mapping[str, Any]) -> str:
  """'lr=0.0003+flow_loss_weight=2.0': last key component = value, filesystem-safe."""
  text = "+".join(f"{k.rsplit('.', 1)[-1]}={os.path.basename(str(v)).removesuffix('.py')}"
                  for k, v in values.items())
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:80]


def expand(sweep_path: str, root: str) -> tuple[str, list[Run]]:
  """(sweep name, runs) with unique names and workdirs; keys shared by every run stay out of the names."""
  module = load_sweep(sweep_path)
  sweep_name = os.path.basename(sweep_path.partition(":")[0]).removesuffix(".py")
  dicts = [dict(d) for d in module.sweep()]
  if not dicts:
    raise ValueError(f"{sweep_path}: sweep() yielded no runs")
  varying = [k for k in dict.fromkeys(k for d in dicts for k in d)
             if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1]
  runs = []
  for i, d in enumerate(dicts):
    config = d.pop("config", module.CONFIG)
    label = _short({k: (config if k == "config" else d[k]) for k in varying if k in d or k == "config"})
    slug = re.sub(r"[^a-z0-9-]", "-", sweep_name.lower())[:30].strip("-")
    runs.append(Run(index=i, name=f"{slug}-{i:02d}", config=config, overrides=d,
                    workdir=os.path.join(root, sweep_name, f"{i:02d}_{label}" if label else f"{i:02d}")))
  return sweep_name, runs


def launch_command(run: Run, launcher: str, launcher_args: Sequence[str], *, dry_run: bool) -> list[str]:
  """The launcher invocation of one run: launcher options, then CONFIG WORKDIR and the overrides."""
  config_args = run.config_args()
  config, overrides = config_args[0].removeprefix("--config="), config_args[1:]
  tail = [config, run.workdir, *overrides]
  dry = ["--dry_run"] if dry_run else []
  if launcher == "local":
    return [os.path.join(_REPO, "launch", "local.sh"), *tail]
  if launcher == "tpu_vm":
    return [os.path.join(_REPO, "launch", "tpu_vm.sh"), *launcher_args, f"--run_name={run.name}", *dry, *tail]
  if launcher == "gke":
    return [sys.executable, "-m", "launch.gke.jobset", *launcher_args, f"--name={run.name}", *dry, *tail]
  return [os.path.join(_REPO, "launch", "slurm_submit.sh"), *launcher_args, f"--job_name={run.name}", *dry,
          *tail]


# ----------------------------------------------------------------------------------------------------
# Summary


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every metric in WORKDIR/metrics.jsonl ('step' = the last step logged); {} if none."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  out: dict[str, float] = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a preemption
    out.update(row)
  return out


def summarize(runs: Sequence[Run], *, metric: str, mode: str, columns: Sequence[str]) -> tuple[str, str]:
  """(markdown, csv): one row per run, best --metric first, runs without the metric last.

  Override columns are those that differ between runs (all of them for a single run).
  """
  keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
  varying = [k for k in keys if len({repr(r.overrides.get(k)) for r in runs}) > 1]
  keys = varying if varying or len(runs) > 1 else keys
  shown = [metric] + [c for c in columns if c != metric]
  rows = []
  for r in runs:
    m = final_metrics(r.workdir)
    row = {"run": r.name, "config": os.path.basename(r.config), **{k: r.overrides.get(k, "") for k in keys},
           "step": int(m["step"]) if "step" in m else "", **{c: m.get(c, "") for c in shown},
           "workdir": r.workdir}
    rows.append(row)
  sign = 1.0 if mode == "min" else -1.0
  def order(row):
    v = row[metric]
    ok = isinstance(v, (int, float)) and math.isfinite(v)
    return (0, sign * v) if ok else (1, 0.0)
  rows.sort(key=order)
  header = list(rows[0])
  fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)
  md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  md += ["| " + " | ".join(fmt(row[h]) for h in header) + " |" for row in rows]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=header)
  writer.writeheader()
  writer.writerows(rows)
  return "\n".join(md) + "\n", buf.getvalue()


def write_summary(sweep_dir: str, runs: Sequence[Run]) -> str:
  markdown, table = summarize(runs, metric=_METRIC.value, mode=_MODE.value, columns=_COLUMNS.value)
  out = epath.Path(sweep_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.md").write_text(markdown)
  (out / "summary.csv").write_text(table)
  print(markdown, end="")
  print(f"wrote {out / 'summary.md'} and {out / 'summary.csv'}", file=sys.stderr)
  return markdown


# ----------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  sweep_name, runs = expand(_SWEEP.value, _ROOT.value)
  if _ONLY.value:
    runs = [r for r in runs if str(r.index) in _ONLY.value]
  sweep_dir = os.path.join(_ROOT.value, sweep_name)
  if _SUMMARIZE.value:
    write_summary(sweep_dir, runs)
    return
  for r in runs:  # a misspelt field or a bad value fails here, before anything is started
    record.resolve_config(r.config_args())
  launcher_args = shlex.split(_LAUNCHER_ARGS.value)
  commands = [launch_command(r, _LAUNCHER.value, launcher_args, dry_run=_DRY_RUN.value) for r in runs]
  if not _DRY_RUN.value:
    epath.Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(sweep_dir) / "sweep.json").write_text(json.dumps(
        {"sweep": _SWEEP.value, "launcher": _LAUNCHER.value, "runs": [
            dict(dataclasses.asdict(r), command=shlex.join(c)) for r, c in zip(runs, commands, strict=True)]},
        indent=2, default=str))
  failed = []
  for r, cmd in zip(runs, commands, strict=True):
    print(f"# run {r.index}: {r.name} -> {r.workdir}\n{shlex.join(cmd)}", flush=True)
    if _DRY_RUN.value and _LAUNCHER.value == "local":
      continue
    result = subprocess.run(cmd, cwd=os.getcwd(), check=False)
    if result.returncode:
      logging.error("run %s (%s) exited with %d", r.index, r.name, result.returncode)
      failed.append(r.name)
  if _LAUNCHER.value == "local" and not _DRY_RUN.value:
    write_summary(sweep_dir, runs)
  if failed:
    raise SystemExit(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
  flags.mark_flag_as_required("sweep")
  app.run(main)
