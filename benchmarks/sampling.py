"""Sampling speed: seconds per image vs steps and resolution with and without the text-prefix KV cache, and
text decoding tokens/s with and without the KV cache. Random weights (speed does not depend on them).

  python -m benchmarks.sampling                      # writes benchmarks/results/sampling_<platform>.json
  python -m benchmarks.sampling --prompt_len=256 --hidden=256
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tuna2_jax import sample, sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2


def _model(args) -> tuple[ModelConfig, dict]:
  heads, mlp = args.hidden // 32, 3 * args.hidden
  cfg = ModelConfig(vocab_size=512, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                    num_kv_heads=2, head_dim=32, mlp_dim=mlp, flow_layers=args.flow_layers, flow_heads=heads,
                    flow_kv_heads=2, flow_head_dim=32, flow_mlp_dim=mlp, patch_size=args.patch)
  doc = [sequence.Text([1, 2]), sequence.Image(np.zeros((args.patch,) * 2 + (3,), np.uint8), "generate")]
  row = sequence.pack_documents([doc], seq_len=8, patch_size=args.patch)
  batch = jax.tree.map(jnp.asarray, sequence.stack_rows([row]))
  return cfg, nn.unbox(jax.jit(Tuna2(cfg).init)(jax.random.key(0), batch)["params"])


def _best_of(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--flow_layers", type=int, default=2)
  parser.add_argument("--patch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=256)
  parser.add_argument("--sizes", default="32,64")
  parser.add_argument("--steps", default="10,25")
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  cfg, params = _model(args)
  prompt = list(np.random.default_rng(0).integers(8, 500, args.prompt_len))
  rows = []
  for size in map(int, args.sizes.split(",")):
    for steps in map(int, args.steps.split(",")):
      res = {}
      for cache in (True, False):
        fn = lambda cache=cache, size=size, steps=steps: sample.generate_image(
            params, cfg, prompt, height=size, width=size, steps=steps, cfg_scale=3.0, use_cache=cache)
        res[cache] = _best_of(fn, args.repeats)
      rows.append(dict(kind="image", size=size, patches=(size // args.patch) ** 2, steps=steps,
                       cfg=True, s_per_image_cached=res[True], s_per_image_recompute=res[False],
                       speedup=res[False] / res[True]))
      print(f"image {size}x{size} ({rows[-1]['patches']} patches) {steps:3d} steps  cached "
            f"{res[True]:7.3f} s  recompute {res[False]:7.3f} s  speedup {rows[-1]['speedup']:.2f}x",
            flush=True)
  res = {}
  for cache in (True, False):
    fn = lambda cache=cache: sample.generate_text(params, cfg, [prompt, prompt[::-1]],
                                                  max_new_tokens=args.new_tokens, use_cache=cache)
    res[cache] = 2 * args.new_tokens / _best_of(fn, args.repeats)
  rows.append(dict(kind="text", batch=2, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   tokens_per_s_cached=res[True], tokens_per_s_recompute=res[False],
                   speedup=res[True] / res[False]))
  print(f"text  batch 2, prompt {args.prompt_len}, {args.new_tokens} new tokens  "
        f"cached {res[True]:8.1f} tok/s  recompute {res[False]:8.1f} tok/s  "
        f"speedup {rows[-1]['speedup']:.2f}x")
  platform = jax.devices()[0].platform
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"sampling_{platform}.json")
  meta = dict(platform=platform, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              cpu_count=os.cpu_count(), model=dict(hidden=args.hidden, layers=args.layers,
                                                   flow_layers=args.flow_layers, patch=args.patch),
              prompt_len=args.prompt_len, sampler="euler", cfg_scale=3.0,
              note="best of repeats after a compile run; CFG branches batched; random weights; "
                   "2 shared CPU cores under load from other jobs: ratios matter, absolute times are noisy")
  with open(out, "w") as f:
    json.dump(dict(meta=meta, results=rows), f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
