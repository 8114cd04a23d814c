"""Runs every benchmark under benchmarks/ (what `make bench` runs), each in its own subprocess.

  python -m benchmarks.run_all                      # quick settings, JSON into runs/bench/
  python -m benchmarks.run_all --full               # each benchmark's own defaults -> benchmarks/results/
  python -m benchmarks.run_all --only=train_step,aot_tpu

Modules, in order: forward, input_pipeline, attention, sampling, checkpoint, train_step, aot_tpu (those that
exist; `study` is left out: it trains several models for tens of minutes). Quick mode passes each module its
quick flags (its own --quick / --smoke where it has one, else smaller sizes) and points its --out into
--out_dir, so a quick run never overwrites the full results checked in under benchmarks/results/.
A subprocess per module: one benchmark's crash, timeout or memory use cannot take the others down, and each
starts with a fresh JAX runtime. Failures are reported and the run continues; the summary lists every module's
status, time and the JSON files it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Bench:
  name: str                       # benchmarks/<name>.py
  quick: tuple[str, ...] = ()     # flags of the quick run
  has_out: bool = True            # accepts --out=<file>; quick runs write there instead of results/


BENCHES = (
    Bench("forward", ("--sizes=debug", "--rounds=1", "--repeats=2")),
    Bench("input_pipeline", ("--num_batches=10", "--workers=0")),
    Bench("attention", ("--smoke",)),           # --smoke writes nothing (every code path at tiny sizes)
    Bench("sampling", ("--sizes=32", "--steps=10", "--repeats=1")),
    Bench("checkpoint", ("--sizes=tiny", "--repeats=1")),
    Bench("train_step", ("--quick",)),
    Bench("aot_tpu", ("--cases=0p5b-v5e16", "--fresh")),
)
EXCLUDED = ("study",)  # long: trains several models

flags.DEFINE_bool("full", False, "run each benchmark with its own defaults (writes benchmarks/results/)")
flags.DEFINE_string("only", "", "comma-separated subset of the module names")
flags.DEFINE_string("out_dir", "runs/bench", "quick mode: where the JSON results go")
flags.DEFINE_integer("timeout", 3600, "seconds per benchmark before it is stopped")
FLAGS = flags.FLAGS


def run_one(bench: Bench, out_dir: pathlib.Path) -> dict:
  args = [sys.executable, "-m", f"benchmarks.{bench.name}"]
  candidates: list[pathlib.Path] = []
  if not FLAGS.full:
    args += list(bench.quick)
    if bench.has_out:
      candidates.append(out_dir / f"{bench.name}.json")
      args.append(f"--out={candidates[0]}")
  print(f"=== {bench.name}: {' '.join(args[2:])}", flush=True)
  start, t0 = time.time(), time.perf_counter()
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  killed = threading.Event()
  watchdog = threading.Timer(FLAGS.timeout, lambda: (killed.set(), proc.kill()))
  watchdog.start()
  # The output streams through (each benchmark prints its table); its "wrote <file>.json" lines name what
  # it wrote. Not every JSON modified meanwhile: other people's runs write to benchmarks/results/ too.
  for line in proc.stdout:
    sys.stdout.write(line)
    candidates += [pathlib.Path(m) if m.startswith("/") else ROOT / m
                   for m in re.findall(r"wrote (\S+\.json)", line)]
  rc = proc.wait()
  watchdog.cancel()
  status = ("ok" if rc == 0 else f"timed out after {FLAGS.timeout} s" if killed.is_set()
            else f"failed (exit {rc})")
  written = sorted({str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                    for p in candidates if p.exists() and p.stat().st_mtime >= start})
  return dict(name=bench.name, status=status, seconds=time.perf_counter() - t0, written=written)


def main(argv):
  del argv
  only = set(filter(None, FLAGS.only.split(",")))
  known = {b.name for b in BENCHES}
  if only - known:
    raise app.UsageError(f"--only: unknown {sorted(only - known)}; known {sorted(known)}")
  out_dir = (ROOT / FLAGS.out_dir).resolve()
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = []
  for bench in BENCHES:
    if only and bench.name not in only:
      continue
    if not (ROOT / "benchmarks" / f"{bench.name}.py").exists():
      summary.append(dict(name=bench.name, status="absent", seconds=0.0, written=[]))
      continue
    summary.append(run_one(bench, out_dir))
  print(f"\n=== summary ({'full' if FLAGS.full else 'quick'}; excluded: {', '.join(EXCLUDED)}; "
        f"load {os.getloadavg()[0]:.1f})")
  for s in summary:
    print(f"{s['name']:16} {s['status']:28} {s['seconds']:7.0f} s  {', '.join(s['written']) or '-'}")
  if any(s["status"] not in ("ok", "absent") for s in summary):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
