"""Input pipeline throughput: packed rows/s, tokens/s, images/s and packing efficiency with 0/1/2 workers.

  python -m benchmarks.input_pipeline [--num_batches=40] [--out=benchmarks/results/input_cpu.json]

Builds a tuna_shapes dataset (2,000 train records) under --data_dir if missing, then reads the tiny config's
batches (16 rows x 512 tokens, patch 8), and times the tiny model's train step on pre-read batches to give
the ratio pipeline rows/s : train-step rows/s (> 1: the pipeline is not the bottleneck).
Tokens/s counts non-padding tokens. The first batches (worker start, warm-up) are not timed.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags

from configs import tuna2_tiny
from data import shapes
from tuna2_jax.input import pipeline

flags.DEFINE_string("data_dir", "runs/bench_data", "where the benchmark's tuna_shapes lives")
flags.DEFINE_integer("num_batches", 120, "timed batches per setting")
flags.DEFINE_string("workers", "0,1,2", "worker counts to measure")
flags.DEFINE_string("out", "benchmarks/results/input_cpu.json", "JSON result file")
FLAGS = flags.FLAGS


def measure(config, num_batches: int) -> dict:
  it = pipeline.make_train_iterator(config)
  t0 = time.perf_counter()
  for _ in range(3):
    next(it)
  warmup = time.perf_counter() - t0
  rows = tokens = imgs = 0
  t0 = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
    rows += b["tokens"].shape[0]
    tokens += int((b["segment_ids"] > 0).sum())
    imgs += sum(len(np.unique(r[r > 0])) for r in b["image_ids"])
  dt = time.perf_counter() - t0
  del it
  gc.collect()
  length = config.data.seq_len
  return dict(workers=config.data.num_workers, rows_per_s=rows / dt, tokens_per_s=tokens / dt,
              images_per_s=imgs / dt, packing_efficiency=tokens / (rows * length), warmup_s=warmup,
              timed_batches=num_batches, seconds=dt)


def train_consumption(config, steps: int = 12) -> dict | None:
  """Rows/s the tiny model's train step consumes, fed pre-read batches (the pipeline out of the loop)."""
  try:
    from tuna2_jax import train  # noqa: PLC0415
  except ImportError as e:
    return dict(error=f"trainer not importable: {e}")
  c = config.copy_and_resolve_references()
  c.data.num_workers = 0
  # Log at step `steps`, finished during step `steps + 1`: the final checkpoint save stays out of the timing.
  c.train.steps, c.train.log_every, c.checkpoint.every = steps + 1, steps // 2, 0
  it = pipeline.make_train_iterator(c)
  batches = [next(it) for _ in range(4)]
  with tempfile.TemporaryDirectory() as workdir:
    last = train.train_and_evaluate(c, workdir, batches=itertools.cycle(batches))
  step_time = last["step_time"]
  return dict(step_time_s=step_time, rows_per_s=c.data.global_batch_size / step_time,
              tokens_per_s=last["tokens_per_s"])


def main(argv):
  del argv
  if not os.path.isdir(os.path.join(FLAGS.data_dir, shapes.NAME)):
    shapes.build(FLAGS.data_dir, num_train=2000, num_test=100, num_workers=2)
  config = tuna2_tiny.get_config()
  config.data.data_dir = FLAGS.data_dir
  results = []
  for w in (int(x) for x in FLAGS.workers.split(",")):
    config.data.num_workers = w
    results.append(measure(config, FLAGS.num_batches))
  step = train_consumption(config)
  out = dict(benchmark="input_pipeline", config="tuna2_tiny", seq_len=config.data.seq_len,
             batch_size=config.data.global_batch_size, patch_size=config.model.patch_size,
             packing=config.data.packing, packing_bins=config.data.packing_bins, cpu_count=os.cpu_count(),
             machine=platform.machine(), python=platform.python_version(), results=results,
             tiny_train_step=step)
  if step and "rows_per_s" in step:
    for r in results:  # > 1: the pipeline outpaces training
      r["ratio_to_train_step"] = r["rows_per_s"] / step["rows_per_s"]
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"{'workers':>7} {'rows/s':>8} {'tokens/s':>9} {'images/s':>9} {'packing':>8} {'warm-up s':>9}")
  for r in results:
    print(f"{r['workers']:>7} {r['rows_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} {r['images_per_s']:>9.1f} "
          f"{r['packing_efficiency']:>8.3f} {r['warmup_s']:>9.2f}")
  print(f"tiny train step: {step}")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
