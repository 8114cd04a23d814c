"""Full train-step throughput: tokens/s (and MFU where the chip's peak is known) of `train.jit_train_step`.

  python -m benchmarks.train_step                         # CPU -> benchmarks/results/train_step_cpu.json
  python -m benchmarks.train_step --quick                 # debug + tiny, one round (what `make bench` runs)
  python -m benchmarks.train_step --gpu_attention=pallas,cudnn   # on a GPU -> train_step_gpu.json

What one step is: `train.create_train_state` + `train.jit_train_step` (loss, grads, clip, AdamW, donation),
exactly what the training loop runs, timed until the new state and the metrics are ready.

CPU (jax.default_backend() == "cpu"): for the debug and tiny configs and a 0.5B-shaped config, two batches
go through the same compiled step:
  - `contract`: random packed rows of the contract (text, understanding and generation images, several
    documents per row), the workload the trainer sees;
  - `text`: a text-only batch (one causal document per row), the like-for-like input for the comparison.
Side by side in the same run, HF transformers `Qwen2ForCausalLM` + `torch.optim.AdamW` (same betas, eps,
weight decay and grad clipping) trains on the same text shapes (benchmarks/train_step_torch.py in
.venv-parity, a subprocess, never at the same time as JAX). Rounds alternate JAX and PyTorch, so load from
other processes on a shared machine hits both alike; the ratio is ours / theirs in tokens/s (> 1: ours is
faster). Our step always runs the flow head too (it sees every token), which HF's model does not have, so
the JSON also gives model FLOP/s of both sides (ours: flops.train_flops; theirs: the same count restricted
to the backbone).
The 0.5B shape is shrunk to fit a 2-core CPU: its width, heads, MLP and vocabulary, but 2 decoder layers,
1 flow-head layer, sequence 256, float32, no remat, dense XLA attention (all stated in the JSON).

GPU (jax.default_backend() == "gpu"): the 0.5B and 1.5B presets as they are (bfloat16 compute, remat,
every layer) at sequence --gpu_seq_len (4096) with --gpu_rows rows per device, once per attention backend in
--gpu_attention (a backend that fails to compile or run is recorded with its error), reporting tokens/s,
step time and MFU (flops.train_flops / step time / the H100/H200/A100 peak in flops.PEAK_FLOPS).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags

from tests.helpers import random_row
from tuna2_jax import flops, optim, sequence, sharding, train
from tuna2_jax.kernels import dispatch
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

flags.DEFINE_string("sizes", "debug,tiny,0p5b", "CPU: config sizes (configs/tuna2_<size>.py)")
flags.DEFINE_integer("rounds", 3, "rounds alternating the JAX and the PyTorch measurements")
flags.DEFINE_integer("repeats", 3, "timed steps per batch kind and round")
flags.DEFINE_integer("warmup", 1, "untimed steps after compilation")
flags.DEFINE_integer("max_batch", 4, "CPU: rows per batch at most (the config's batch otherwise)")
flags.DEFINE_string("torch_threads", "0,1", "PyTorch intra-op thread counts to measure (0: torch's default)")
flags.DEFINE_string("torch_python", ".venv-parity/bin/python", "interpreter with torch + transformers")
flags.DEFINE_bool("quick", False, "debug and tiny only, one round of two steps, one-thread PyTorch")
flags.DEFINE_string("gpu_sizes", "0p5b,1p5b", "GPU: presets measured at full size")
flags.DEFINE_integer("gpu_seq_len", 4096, "GPU: tokens per packed row")
flags.DEFINE_integer("gpu_rows", 4, "GPU: rows per device (global batch = rows x device count)")
flags.DEFINE_string("gpu_attention", "pallas,cudnn,chunked,xla", "GPU: attention backends to measure")
flags.DEFINE_string("out", "", "JSON result file (default benchmarks/results/train_step_<platform>.json)")
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]
LARGE = ("0p5b", "1p5b", "7b")
# CPU shrink of the large presets: their width, heads, MLP and vocabulary; depth, length and dtype that run
# in seconds on 2 cores. float32: XLA:CPU has no fast bfloat16 matmul, and the PyTorch side is float32.
CPU_SHRINK = dict(num_layers=2, flow_layers=1, dtype="float32", remat="none", attention="xla")
CPU_SHRINK_DATA = dict(seq_len=256, global_batch_size=2)


# ----------------------------------------------------------------------------------------------------
# Configs and batches


def load_config(size: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.tuna2_{size}").get_config()


def cpu_config(size: str, max_batch: int) -> tuple[ml_collections.ConfigDict, dict]:
  """The config measured on CPU and what was changed from the preset (stated in the JSON)."""
  c = load_config(size)
  changes: dict = {}
  if size in LARGE:
    changes = {f"model.{k}": v for k, v in CPU_SHRINK.items()}
    changes.update({f"data.{k}": v for k, v in CPU_SHRINK_DATA.items()})
    c.model.update(CPU_SHRINK)
    c.data.update(CPU_SHRINK_DATA)
  if c.data.global_batch_size > max_batch:
    changes["data.global_batch_size"] = max_batch
    c.data.global_batch_size = max_batch
  c.mesh.shape.update(dict(data=1, fsdp=-1, tensor=1, sequence=1))  # FSDP over whatever devices there are
  return c, changes


def contract_batch(c: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """Packed rows of random documents (text, understanding and generation images), filled to the row."""
  seq_len, patch = c.data.seq_len, c.model.patch_size
  # Documents scale with the row so a row holds several of them: text up to L/16 tokens, images up to
  # sqrt(L/16) patches a side (4096: 256 tokens, 16 x 16 patches).
  kw = dict(max_text=max(12, seq_len // 16), max_grid=max(3, int(math.sqrt(seq_len // 16))))
  rng = np.random.default_rng(seed)
  rows = [random_row(rng, seq_len=seq_len, patch_size=patch, vocab=c.model.vocab_size, max_docs=10_000, **kw)
          for _ in range(c.data.global_batch_size)]
  return sequence.stack_rows(rows)


def text_batch(c: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(seed).integers(
      0, c.model.vocab_size, (c.data.global_batch_size, c.data.seq_len), np.int32)
  return sequence.text_batch(tokens, c.model.patch_size)


def batch_stats(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
  seg, modality = np.asarray(batch["segment_ids"]), np.asarray(batch["modality"])
  real = max(int(np.sum(seg > 0)), 1)
  return dict(rows=int(seg.shape[0]), seq_len=int(seg.shape[1]), fill=real / seg.size,
              image_token_fraction=float(np.sum(modality == sequence.PATCH)) / real,
              documents_per_row=float(np.mean([len(np.unique(r[r > 0])) for r in seg])))


def backbone_train_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray]) -> float:
  """flops.train_flops restricted to what HF's Qwen2ForCausalLM computes: decoder blocks, attention over
  the allowed pairs, LM head (no flow head, no pixel or timestep embeddings)."""
  seg = np.asarray(batch["segment_ids"])
  tokens = int(np.sum(seg > 0))
  pairs = flops.allowed_pairs(seg, np.asarray(batch["attn_end"]), np.asarray(batch["positions"]))
  d, hd = cfg.hidden_size, cfg.head_dim
  block = 2 * (d * cfg.num_heads * hd * 2 + 2 * d * cfg.num_kv_heads * hd + 3 * d * cfg.mlp_dim)
  forward = cfg.num_layers * (tokens * block + 4 * pairs * cfg.num_heads * hd)
  return 3.0 * (forward + 2 * tokens * d * cfg.vocab_size)


# ----------------------------------------------------------------------------------------------------
# The JAX side


@dataclasses.dataclass
class Stepper:
  """A compiled train step and its (donated) state; `run(batch)` times one step."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  step_fn: Callable
  state: train.TrainState
  batch_shardings: dict
  compile_s: float = 0.0

  def put(self, batch_np: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return train.global_batch(batch_np, self.batch_shardings)

  def run(self, batch: Mapping[str, jax.Array]) -> float:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.rules_from_config(self.config.mesh.rules)):
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, batch)
      jax.block_until_ready((self.state, metrics))
      return time.perf_counter() - t0


def make_stepper(c: ml_collections.ConfigDict, example: Mapping[str, np.ndarray]) -> Stepper:
  devices = jax.devices()
  model_cfg = train.validate_config(c, len(devices))
  mesh = sharding.make_mesh(c.mesh.shape.to_dict(), devices)
  model = Tuna2(model_cfg)
  tx, schedule = optim.make_optimizer(c.optim, c.train.steps)
  state, state_sh = train.create_train_state(c, model, tx, mesh)
  batch_sh = sharding.batch_shardings(example, mesh)
  step_fn = train.jit_train_step(c, model, tx, schedule, mesh, state_sh, batch_sh)
  stepper = Stepper(c, model_cfg, mesh, step_fn, state, batch_sh)
  stepper.compile_s = stepper.run(stepper.put(example))  # the first call compiles
  return stepper


def throughput(model_cfg: ModelConfig, batch: Mapping[str, np.ndarray], seconds: float) -> dict[str, float]:
  device = jax.devices()[0]
  out = train.step_throughput(model_cfg, batch, seconds, device.device_kind, jax.device_count())
  out["model_tflop_per_s"] = flops.train_flops(model_cfg, batch) / seconds / 1e12
  return out


# ----------------------------------------------------------------------------------------------------
# The PyTorch side (a subprocess in the parity venv)


def torch_case(name: str, c: ml_collections.ConfigDict) -> dict:
  m = c.model
  return dict(name=name, batch=c.data.global_batch_size, seq_len=c.data.seq_len, vocab_size=m.vocab_size,
              hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
              num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim,
              tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta, rms_eps=m.rms_eps)


def run_torch(case: dict, *, warmup: int, repeats: int, threads: int) -> dict:
  python = ROOT / FLAGS.torch_python
  if not python.exists():
    return dict(error=f"{FLAGS.torch_python} missing (make golden creates it): PyTorch column skipped")
  cmd = [str(python), str(ROOT / "benchmarks" / "train_step_torch.py"), f"--cases={json.dumps([case])}",
         f"--warmup={warmup}", f"--repeats={repeats}", f"--threads={threads}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    return dict(error=f"train_step_torch.py failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# CPU: ours (contract and text batches) next to HF + PyTorch on the text shapes


def measure_cpu(size: str, *, rounds: int, repeats: int, warmup: int, torch_threads: list[int]) -> dict:
  c, changes = cpu_config(size, FLAGS.max_batch)
  batches = {"contract": contract_batch(c), "text": text_batch(c)}
  stepper = make_stepper(c, batches["text"])
  on_device = {k: stepper.put(b) for k, b in batches.items()}
  for _ in range(warmup):
    for b in on_device.values():
      stepper.run(b)
  sides = {("torch" if t == 0 else f"torch_{t}thread"): t for t in torch_threads}
  times: dict[str, list[float]] = {k: [] for k in (*batches, *sides)}
  case, info = torch_case(size, c), {}
  for _ in range(rounds):  # alternate the sides: a load change hits both alike
    for kind, b in on_device.items():
      times[kind] += [stepper.run(b) for _ in range(repeats)]
    for side, threads in sides.items():
      info[side] = run_torch(case, warmup=warmup, repeats=repeats, threads=threads)
      times[side] += [t / 1e3 for t in info[side].get("results", [{}])[0].get("step_times_ms", [])]
  row: dict = dict(name=size, changes_from_preset=changes, compile_s=stepper.compile_s,
                   shapes={k: v for k, v in case.items() if k != "name"},
                   params=int(sum(x.size for x in jax.tree.leaves(stepper.state.params))))
  for kind, b in batches.items():
    med = statistics.median(times[kind])
    row[kind] = dict(batch_stats(b), step_ms=1e3 * med, min_step_ms=1e3 * min(times[kind]),
                     **throughput(stepper.model_cfg, b, med))
  text_tokens = float(np.sum(batches["text"]["segment_ids"] > 0))
  backbone = backbone_train_flops(stepper.model_cfg, batches["text"])
  row["ratio"] = {}
  for side in sides:
    if not times[side]:
      row[side] = dict(error=info[side].get("error", "no times"))
      continue
    med = statistics.median(times[side])
    result = info[side]["results"][0]
    row[side] = dict(step_ms=1e3 * med, min_step_ms=1e3 * min(times[side]), tokens_per_s=text_tokens / med,
                     model_tflop_per_s=backbone / med / 1e12, threads=info[side]["threads"],
                     params=result["params"], attn_implementation=result["attn_implementation"],
                     torch=info[side]["torch"], transformers=info[side]["transformers"])
    row["ratio"][f"text_tokens_per_s_ours_over_{side}"] = (row["text"]["tokens_per_s"]
                                                           / row[side]["tokens_per_s"])
    row["ratio"][f"model_flops_per_s_ours_over_{side}"] = (row["text"]["model_tflop_per_s"]
                                                           / row[side]["model_tflop_per_s"])
  del stepper
  return row


def cpu_table(rows: list[dict]) -> str:
  head = ("| size | B x L | ours contract tok/s | ours text tok/s | torch tok/s | torch 1-thr tok/s | "
          "ours/torch | ours/torch 1-thr | FLOP/s ours/torch 1-thr |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    get = lambda side, r=r: f"{r[side]['tokens_per_s']:,.0f}" if "tokens_per_s" in r.get(side, {}) else "n/a"
    ratio = lambda key, r=r: f"{r['ratio'][key]:.2f}" if key in r["ratio"] else "n/a"
    lines.append(
        f"| {r['name']} | {r['text']['rows']}x{r['text']['seq_len']} | {get('contract')} | {get('text')} | "
        f"{get('torch')} | {get('torch_1thread')} | {ratio('text_tokens_per_s_ours_over_torch')} | "
        f"{ratio('text_tokens_per_s_ours_over_torch_1thread')} | "
        f"{ratio('model_flops_per_s_ours_over_torch_1thread')} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# GPU: the 0.5B and 1.5B presets at full size, per attention backend


def measure_gpu(size: str, impl: str, *, repeats: int, warmup: int) -> dict:
  c = load_config(size)
  n = jax.device_count()
  c.data.seq_len, c.data.global_batch_size = FLAGS.gpu_seq_len, FLAGS.gpu_rows * n
  c.model.attention = impl
  c.mesh.shape.update(dict(data=1, fsdp=-1, tensor=1, sequence=1))  # ZeRO-3 over the node's GPUs
  choice, fallback = dispatch.select(impl, platform="gpu", length=c.data.seq_len, head_dim=c.model.head_dim,
                                     dtype=c.model.dtype)
  row: dict = dict(name=size, attention=impl, ran=choice.impl, fallback=fallback, reason=choice.reason,
                   dtype=c.model.dtype, remat=c.model.remat, devices=n,
                   device_kind=jax.devices()[0].device_kind)
  try:
    batch = contract_batch(c)
    stepper = make_stepper(c, batch)
    b = stepper.put(batch)
    for _ in range(warmup):
      stepper.run(b)
    times = [stepper.run(b) for _ in range(repeats)]
    med = statistics.median(times)
    row.update(batch_stats(batch), compile_s=stepper.compile_s, step_ms=1e3 * med,
               min_step_ms=1e3 * min(times), **throughput(stepper.model_cfg, batch, med))
    del stepper, b
  except Exception as e:  # noqa: BLE001  (one backend failing must not hide the others)
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  return row


def gpu_table(rows: list[dict]) -> str:
  lines = ["| preset | attention (ran) | B x L | step ms | tokens/s | MFU |", "|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | {r['attention']} ({r['ran']}) | | error: {r['error'][:60]} | | |")
    else:
      lines.append(f"| {r['name']} | {r['attention']} ({r['ran']}) | {r['rows']}x{r['seq_len']} | "
                   f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r.get('mfu', float('nan')):.1%} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv):
  del argv
  backend = jax.default_backend()
  load_before = os.getloadavg()
  rounds, repeats = (1, 2) if FLAGS.quick else (FLAGS.rounds, FLAGS.repeats)
  method = dict(warmup=FLAGS.warmup, repeats_per_round=repeats, statistic="median over all timed steps",
                step="train.jit_train_step on train.create_train_state (grads, clip, AdamW, donation), "
                     "timed until state and metrics are ready",
                tokens="non-padding tokens (segment_ids > 0)")
  if backend == "gpu":
    rows = [measure_gpu(size, impl, repeats=repeats, warmup=FLAGS.warmup)
            for size in FLAGS.gpu_sizes.split(",") for impl in FLAGS.gpu_attention.split(",")]
    for r in rows:
      print(r, flush=True)
    text = gpu_table(rows)
    method.update(seq_len=FLAGS.gpu_seq_len, rows_per_device=FLAGS.gpu_rows,
                  mfu="flops.train_flops(batch) / step time / (peak bf16 FLOP/s x devices); "
                      "remat recomputation not counted")
  else:
    sizes = ["debug", "tiny"] if FLAGS.quick else FLAGS.sizes.split(",")
    threads = [1] if FLAGS.quick else [int(t) for t in FLAGS.torch_threads.split(",")]
    rows = []
    for size in sizes:
      rows.append(measure_cpu(size, rounds=rounds, repeats=repeats, warmup=FLAGS.warmup,
                              torch_threads=threads))
      print(json.dumps(rows[-1], default=float), flush=True)
    text = cpu_table(rows)
    method.update(rounds=rounds, dtype="float32 (both sides)",
                  ratio="ours text-batch tokens/s / PyTorch tokens/s on the same B x L (> 1: ours is faster)",
                  flops_ratio="model FLOP/s: ours flops.train_flops (incl. the flow head), PyTorch "
                              "backbone_train_flops (the same count without the flow head)",
                  torch_1thread="torch.set_num_threads(1): on a shared, oversubscribed CPU torch's OpenMP "
                                "threads can slow down many-fold; one thread is the stable comparison",
                  cpu_shrink_of_large_presets=dict(**CPU_SHRINK, **CPU_SHRINK_DATA),
                  mfu="CPU has no peak in flops.PEAK_FLOPS: tokens/s only")
  result = dict(
      benchmark="full train step (train.jit_train_step): tokens/s, MFU where the peak is known" + (
          "; HF transformers Qwen2ForCausalLM + torch AdamW side by side" if backend == "cpu" else ""),
      machine=dict(cpu=cpu_model(), cpu_count=os.cpu_count(), platform=platform.platform(),
                   loadavg_before=load_before, loadavg_after=os.getloadavg(),
                   note="shared machine: other engineers' jobs ran alongside; compare ratios, not absolutes"),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__),
      jax_device=str(jax.devices()[0]), device_count=jax.device_count(), quick=FLAGS.quick,
      method=method, results=rows)
  out = ROOT / (FLAGS.out or f"benchmarks/results/train_step_{backend}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=float) + "\n")
  print(text)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
