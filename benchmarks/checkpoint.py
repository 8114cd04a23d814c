"""Checkpoint cost: how long the train loop is blocked per save (async vs synchronous), and save / restore
bandwidth, for the tiny and the 0.5B-shaped model on CPU.

  python -m benchmarks.checkpoint [--sizes=tiny,0p5b] [--out=benchmarks/results/checkpoint_cpu.json]

The state is random values in the model's parameter shapes (values do not matter to the I/O): for tiny the
whole AdamW train state (params + two moments, float32); for 0p5b the parameters only, in --large_dtype
(0.74B x bfloat16 = 1.5 GB: a float32 copy peaked at 11 GB resident during the save and was OOM-killed on the
shared 24 GB machine; the full float32 train state would be 9 GB). "blocked" is what `save()` costs
the loop (checksums + device-to-host copy, plus waiting for the previous save, none here); "commit" is until
the step is final on disk. Bandwidths are logical bytes over those times. The first save (compiles the
checksum) is not timed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from configs import common
from tuna2_jax import checkpoint
from tuna2_jax.convert import hf_qwen2
from tuna2_jax.model.config import ModelConfig

flags.DEFINE_string("sizes", "tiny,0p5b", "model sizes of configs/common.MODEL_SIZES")
flags.DEFINE_integer("repeats", 3, "timed saves per setting (one fewer for states over 1 GB)")
flags.DEFINE_string("large_dtype", "bfloat16", "dtype of the parameters of sizes other than debug / tiny")
flags.DEFINE_string("dir", "", "where checkpoints are written (default: a temporary directory)")
flags.DEFINE_string("out", "benchmarks/results/checkpoint_cpu.json", "JSON result file")
FLAGS = flags.FLAGS


def make_state(size: str) -> tuple[dict, ModelConfig, str]:
  model = common.model_config(size).to_dict()
  cfg = ModelConfig.from_dict(model)
  rng = np.random.default_rng(0)
  shapes = hf_qwen2.expected_shapes(cfg)

  small = size in ("debug", "tiny")
  dtype = np.float32 if small else jax.numpy.dtype(FLAGS.large_dtype)

  def random_tree():
    return hf_qwen2.unflatten({n: jax.device_put(rng.random(s.shape, dtype=np.float32).astype(dtype))
                               for n, s in shapes.items()})

  params = random_tree()
  if small:
    state = {"step": jax.device_put(np.int32(100)), "params": params,
             "opt_state": {"mu": random_tree(), "nu": random_tree()}}
    what = "params + AdamW moments (float32)"
  else:
    state = {"step": jax.device_put(np.int32(100)), "params": params}
    what = f"params only ({FLAGS.large_dtype})"
  return state, model, what


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(size: str, root: str, repeats: int) -> dict:
  state, model, what = make_state(size)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  config = {"model": model}
  repeats = repeats if nbytes < 1e9 else max(1, repeats - 1)
  out = dict(size=size, state=what, arrays=len(jax.tree.leaves(state)), bytes=nbytes, repeats=repeats)
  checkpoint.checksums(state)  # compile
  t = time.perf_counter()
  checkpoint.checksums(state)
  out["checksum_s"] = time.perf_counter() - t

  for mode in ("async", "sync"):
    workdir = os.path.join(root, f"{size}_{mode}")
    ckpt = checkpoint.Checkpointer(workdir, keep=2, async_save=mode == "async", with_data=False)
    ckpt.save(0, state, config=config)
    ckpt.wait()
    blocked, commit = [], []
    for step in range(1, repeats + 1):
      t = time.perf_counter()
      ckpt.save(step, state, config=config)
      blocked.append(time.perf_counter() - t)
      ckpt.wait()
      commit.append(time.perf_counter() - t)
    ckpt.close()
    out[f"{mode}_blocked_s"] = float(np.median(blocked))
    out[f"{mode}_commit_s"] = float(np.median(commit))
    out[f"{mode}_save_MBps"] = nbytes / 1e6 / float(np.median(commit))
  out["disk_bytes"] = disk_bytes(os.path.join(root, f"{size}_sync", "checkpoints", str(repeats)))

  workdir = os.path.join(root, f"{size}_sync")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  del state
  ckpt = checkpoint.Checkpointer(workdir, with_data=False)
  restore = []
  for _ in range(2):
    t = time.perf_counter()
    restored, _ = ckpt.restore(abstract)
    jax.block_until_ready(restored)
    restore.append(time.perf_counter() - t)
    del restored
  ckpt.close()
  out["restore_s"] = min(restore)
  out["restore_MBps"] = nbytes / 1e6 / out["restore_s"]
  params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["params"]))
  t = time.perf_counter()
  _, params = checkpoint.restore_params(workdir)
  jax.block_until_ready(params)
  out["restore_params_s"] = time.perf_counter() - t
  out["restore_params_MBps"] = params_bytes / 1e6 / out["restore_params_s"]
  del params
  shutil.rmtree(os.path.join(root, f"{size}_async"), ignore_errors=True)
  shutil.rmtree(workdir, ignore_errors=True)
  return out


def main(argv):
  del argv
  root = FLAGS.dir or tempfile.mkdtemp(prefix="tuna2_ckpt_bench_")
  results = []
  for size in FLAGS.sizes.split(","):
    results.append(measure(size, root, FLAGS.repeats))
    print(json.dumps(results[-1]), flush=True)
  out = dict(benchmark="checkpoint", cpu_count=os.cpu_count(), machine=platform.machine(),
             python=platform.python_version(), jax=jax.__version__, device=jax.devices()[0].device_kind,
             results=results)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\n{'size':6} {'state':34} {'GB':>6} {'async blocked':>14} {'sync blocked':>13} {'save MB/s':>10} "
        f"{'restore MB/s':>13} {'params-only s':>14}")
  for r in results:
    print(f"{r['size']:6} {r['state']:34} {r['bytes'] / 1e9:6.3f} {r['async_blocked_s']:13.3f}s "
          f"{r['sync_blocked_s']:12.3f}s {r['async_save_MBps']:10.0f} {r['restore_MBps']:13.0f} "
          f"{r['restore_params_s']:13.3f}s")
  if not FLAGS.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
