"""Text forward and forward+backward time on CPU: our JAX model next to HF transformers Qwen2 (PyTorch).

  python -m benchmarks.forward [--sizes=debug,tiny] [--rounds=3] [--out=benchmarks/results/forward_cpu.json]

Shapes come from configs/tuna2_<size>.py (model section; seq_len from its data section, the batch capped at
--max_batch to keep the run to a few minutes on 2 cores). JAX columns: `tuna2` is
`Tuna2.apply(..., flow=False)` on a text batch, what `api.text_logits` runs (it also computes the patch and
timestep embeddings at every position, then selects the token embeddings); `backbone` is
embed -> decoder -> LM head only, the same computation as HF's Qwen2ForCausalLM. Backward is the gradient
of the mean next-token cross-entropy over all parameters. The PyTorch side runs in .venv-parity
(benchmarks/forward_torch.py, a subprocess, never at the same time as JAX); without that venv its columns
say so. Times are medians, in ms, over --rounds rounds of --repeats runs
after warm-up; rounds alternate the two sides so that load from other processes hits both alike.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
import optax
from absl import app, flags

from tuna2_jax import sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2, decoder_positions

flags.DEFINE_string("sizes", "debug,tiny", "config sizes (configs/tuna2_<size>.py)")
flags.DEFINE_integer("repeats", 5, "timed runs per measurement and round")
flags.DEFINE_integer("rounds", 3, "rounds alternating the JAX and the PyTorch measurements")
flags.DEFINE_integer("max_batch", 4, "rows per batch at most (the config's batch otherwise)")
flags.DEFINE_integer("warmup", 2, "untimed runs after compilation")
flags.DEFINE_string("torch_python", ".venv-parity/bin/python", "interpreter with torch + transformers")
flags.DEFINE_string("out", "benchmarks/results/forward_cpu.json", "JSON result file")
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]


def case_of(size: str, max_batch: int) -> tuple[dict, ModelConfig]:
  """The shapes of one config size (also what forward_torch.py builds) and our ModelConfig."""
  c = importlib.import_module(f"configs.tuna2_{size}").get_config()
  cfg = ModelConfig.from_dict(dict(c.model))
  keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
          "tie_embeddings", "rope_theta", "rms_eps")
  case = dict(name=size, batch=min(c.data.global_batch_size, max_batch), seq_len=c.data.seq_len,
              **{k: getattr(cfg, k) for k in keys})
  return case, cfg


def times_ms(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - t0))
  return times


def _backbone_logits(model: Tuna2, batch) -> jax.Array:
  """Embed -> decoder -> LM head: the computation of HF's Qwen2ForCausalLM."""
  cos, sin = decoder_positions(batch, model.cfg)
  hidden = model.decoder(model.embed(batch["tokens"]), cos=cos, sin=sin, segment_ids=batch["segment_ids"],
                         attn_end=batch["attn_end"])
  return model.lm_logits(hidden)


def jax_runners(case: dict, cfg: ModelConfig, *, warmup: int) -> dict[str, Callable[[], Any]]:
  """Compiled, warmed-up calls: {"tuna2_forward": ..., "backbone_forward_backward": ...}."""
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (case["batch"], case["seq_len"]), np.int32)
  batch = jax.device_put(sequence.text_batch(tokens, cfg.patch_size))
  model = Tuna2(cfg)
  params = jax.jit(lambda k: flax.linen.meta.unbox(model.init(k, batch, flow=False)["params"]))(
      jax.random.key(0))
  paths = {
      "tuna2": lambda p, b: model.apply({"params": p}, b, flow=False).logits,
      "backbone": lambda p, b: model.apply({"params": p}, b, method=_backbone_logits),
  }
  runners = {}
  for name, logits_fn in paths.items():
    def loss_fn(p, b, logits_fn=logits_fn):
      logits = logits_fn(p, b)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["tokens"][:, 1:]).mean()
    fns = {"forward": jax.jit(logits_fn), "forward_backward": jax.jit(jax.value_and_grad(loss_fn))}
    for kind, fn in fns.items():
      run = functools.partial(fn, params, batch)
      for _ in range(1 + warmup):  # compile, then warm up
        jax.block_until_ready(run())
      runners[f"{name}_{kind}"] = run
  return runners


def run_torch(case: dict, *, warmup: int, repeats: int, threads: int) -> dict:
  python = ROOT / FLAGS.torch_python
  if not python.exists():
    return dict(error=f"{FLAGS.torch_python} missing (make golden creates it): PyTorch column skipped")
  cmd = [str(python), str(ROOT / "benchmarks" / "forward_torch.py"), f"--cases={json.dumps([case])}",
         f"--warmup={warmup}", f"--repeats={repeats}", f"--threads={threads}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    return dict(error=f"forward_torch.py failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def table(rows: list[dict]) -> str:
  sides = ("tuna2", "backbone", "torch", "torch_1thread")
  head = f"{'size':6} {'B x L':>8} | " + " | ".join(f"{s + ' fwd':>18} {'fwd+bwd':>8}" for s in sides)
  lines = [head, "-" * len(head)]
  for r in rows:
    cols = [f"{r[s]['forward_ms']:18.1f} {r[s]['forward_backward_ms']:8.1f}" if s in r
            else f"{'(no .venv-parity)':>27}" for s in sides]
    lines.append(f"{r['name']:6} {r['batch']:>3}x{r['seq_len']:<4} | " + " | ".join(cols))
  lines.append("(ms, median; HF torch / our backbone: "
               + "; ".join(f"{r['name']} " + ", ".join(f"{k} {v:.2f}" for k, v in r.get("ratio", {}).items())
                           for r in rows) + ")")
  return "\n".join(lines)


def main(argv):
  del argv
  load_before = os.getloadavg()
  rows, torch_info, torch_threads = [], {}, {}
  torch_sides = {"torch": 0, "torch_1thread": 1}  # name -> intra-op threads (0: torch's default)
  for size in FLAGS.sizes.split(","):
    case, cfg = case_of(size, FLAGS.max_batch)
    runners = jax_runners(case, cfg, warmup=FLAGS.warmup)
    times: dict[str, list[float]] = {k: [] for k in runners}
    times.update({f"{t}_{k}": [] for t in torch_sides for k in ("forward", "forward_backward")})
    # Rounds alternate JAX and PyTorch, so a load change on a shared machine hits both sides alike.
    for _ in range(FLAGS.rounds):
      for k, run in runners.items():
        times[k] += times_ms(run, FLAGS.repeats)
      for side, threads in torch_sides.items():
        torch_info = run_torch(case, warmup=FLAGS.warmup, repeats=FLAGS.repeats, threads=threads)
        torch_threads[side] = torch_info.get("threads")
        for k in ("forward", "forward_backward"):
          times[f"{side}_{k}"] += torch_info["results"][0][f"{k}_times_ms"] if "results" in torch_info else []
    row = dict(case)
    for side in ("tuna2", "backbone", *torch_sides):
      if times[f"{side}_forward"]:
        row[side] = {f"{k}_{stat}": fn(times[f"{side}_{k}"]) for k in ("forward", "forward_backward")
                     for stat, fn in (("ms", statistics.median), ("min_ms", min))}
    if "torch" in row:
      row["torch"]["attn_implementation"] = torch_info["results"][0]["attn_implementation"]
      row["ratio"] = {f"{side}_{k}": row[side][f"{k}_ms"] / row["backbone"][f"{k}_ms"]
                      for side in torch_sides for k in ("forward", "forward_backward")}
    rows.append(row)
    print(f"{size}: {row}", flush=True)
  result = dict(
      benchmark="text forward / forward+backward, JAX (ours) vs HF transformers Qwen2ForCausalLM (PyTorch)",
      machine=dict(cpu=cpu_model(), cpu_count=os.cpu_count(), platform=platform.platform(),
                   loadavg_before=load_before, loadavg_after=os.getloadavg()),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
                    torch=torch_info.get("torch"), transformers=torch_info.get("transformers")),
      jax_device=str(jax.devices()[0]), torch_threads=torch_threads,
      torch_error=torch_info.get("error"),
      method=dict(rounds=FLAGS.rounds, repeats_per_round=FLAGS.repeats, warmup=FLAGS.warmup,
                  statistic="median over all timed runs", unit="ms", loss="mean next-token cross-entropy",
                  dtype="float32", ratio="torch time / our backbone time, medians (> 1: ours is faster)",
                  torch_1thread="torch.set_num_threads(1): on a shared, oversubscribed CPU torch's OpenMP "
                                "threads can slow down many-fold; one thread is the stable comparison",
                  batch_and_seq_len=f"data.seq_len of the config; batch = min(data.global_batch_size, "
                                    f"{FLAGS.max_batch})"),
      results=rows)
  out = ROOT / FLAGS.out
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=float) + "\n")
  print(table(rows))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
