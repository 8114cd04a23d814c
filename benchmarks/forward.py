"""Text forward and forward+backward time on CPU: our JAX model next to HF transformers Qwen2 (PyTorch).

  python -m benchmarks.forward [--sizes=debug,tiny] [--repeats=7] [--out=benchmarks/results/forward_cpu.json]

Shapes come from configs/tuna2_<size>.py (model section; batch and seq_len from its data section). JAX
columns: `tuna2` is `Tuna2.apply(..., flow=False)` on a text batch, what `api.text_logits` runs (it also
computes the patch and timestep embeddings at every position, then selects the token embeddings);
`backbone` is embed -> decoder -> LM head only, the same computation as HF's Qwen2ForCausalLM. Backward is
the gradient of the mean next-token cross-entropy over all parameters. The PyTorch side runs in
.venv-parity (benchmarks/forward_torch.py, a subprocess, after the JAX runs so they do not compete);
without that venv its columns say so. Times are medians of --repeats runs after warm-up, in ms.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import flax
import jax
import numpy as np
import optax
from absl import app, flags

from tuna2_jax import sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2, decoder_positions

flags.DEFINE_string("sizes", "debug,tiny", "config sizes (configs/tuna2_<size>.py)")
flags.DEFINE_integer("repeats", 7, "timed runs per measurement (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed runs after compilation")
flags.DEFINE_string("torch_python", ".venv-parity/bin/python", "interpreter with torch + transformers")
flags.DEFINE_string("out", "benchmarks/results/forward_cpu.json", "JSON result file")
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]


def case_of(size: str) -> tuple[dict, ModelConfig]:
  """The shapes of one config size (also what forward_torch.py builds) and our ModelConfig."""
  c = importlib.import_module(f"configs.tuna2_{size}").get_config()
  cfg = ModelConfig.from_dict(dict(c.model))
  keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
          "tie_embeddings", "rope_theta", "rms_eps")
  case = dict(name=size, batch=c.data.global_batch_size, seq_len=c.data.seq_len,
              **{k: getattr(cfg, k) for k in keys})
  return case, cfg


def median_ms(fn, *, warmup: int, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _backbone_logits(model: Tuna2, batch) -> jax.Array:
  """Embed -> decoder -> LM head: the computation of HF's Qwen2ForCausalLM."""
  cos, sin = decoder_positions(batch, model.cfg)
  hidden = model.decoder(model.embed(batch["tokens"]), cos=cos, sin=sin, segment_ids=batch["segment_ids"],
                         attn_end=batch["attn_end"])
  return model.lm_logits(hidden)


def run_jax(case: dict, cfg: ModelConfig, *, warmup: int, repeats: int) -> dict:
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (case["batch"], case["seq_len"]), np.int32)
  batch = jax.device_put(sequence.text_batch(tokens, cfg.patch_size))
  model = Tuna2(cfg)
  params = jax.jit(lambda k: flax.linen.meta.unbox(model.init(k, batch, flow=False)["params"]))(
      jax.random.key(0))
  paths = {
      "tuna2": lambda p, b: model.apply({"params": p}, b, flow=False).logits,
      "backbone": lambda p, b: model.apply({"params": p}, b, method=_backbone_logits),
  }
  out = {}
  for name, logits_fn in paths.items():
    def loss_fn(p, b, logits_fn=logits_fn):
      logits = logits_fn(p, b)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], b["tokens"][:, 1:]).mean()
    fwd = jax.jit(logits_fn)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    time_ms = lambda fn: median_ms(lambda: fn(params, batch), warmup=warmup, repeats=repeats)
    out[name] = dict(forward_ms=time_ms(fwd), forward_backward_ms=time_ms(fwd_bwd))
  return out


def run_torch(cases: list[dict], *, warmup: int, repeats: int) -> dict:
  python = ROOT / FLAGS.torch_python
  if not python.exists():
    return dict(error=f"{FLAGS.torch_python} missing (make golden creates it): PyTorch column skipped")
  cmd = [str(python), str(ROOT / "benchmarks" / "forward_torch.py"), f"--cases={json.dumps(cases)}",
         f"--warmup={warmup}", f"--repeats={repeats}"]
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


def table(rows: list[dict], torch_ok: bool) -> str:
  head = (f"{'size':6} {'B x L':>9} | {'tuna2 fwd':>9} {'fwd+bwd':>9} | {'backbone fwd':>12} "
          f"{'fwd+bwd':>9} | {'torch fwd':>9} {'fwd+bwd':>9} | {'torch/backbone fwd':>18} {'fwd+bwd':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    j, b, t = r["jax"]["tuna2"], r["jax"]["backbone"], r.get("torch")
    tcols = (f"{t['forward_ms']:9.1f} {t['forward_backward_ms']:9.1f} | {r['ratio']['forward']:18.2f} "
             f"{r['ratio']['forward_backward']:8.2f}") if torch_ok else f"{'(no .venv-parity)':>60}"
    lines.append(f"{r['name']:6} {r['batch']:>4}x{r['seq_len']:<4} | {j['forward_ms']:9.1f} "
                 f"{j['forward_backward_ms']:9.1f} | {b['forward_ms']:12.1f} "
                 f"{b['forward_backward_ms']:9.1f} | " + tcols)
  return "\n".join(lines) + "\n(ms, median; ratio > 1: our JAX backbone is faster)"


def main(argv):
  del argv
  load_before = os.getloadavg()
  cases, rows = [], []
  for size in FLAGS.sizes.split(","):
    case, cfg = case_of(size)
    cases.append(case)
    rows.append(dict(case, jax=run_jax(case, cfg, warmup=FLAGS.warmup, repeats=FLAGS.repeats)))
    print(f"{size}: jax {rows[-1]['jax']}", flush=True)
  torch = run_torch(cases, warmup=FLAGS.warmup, repeats=FLAGS.repeats)
  torch_ok = "results" in torch
  for row, t in zip(rows, torch.get("results", [{}] * len(rows)), strict=True):
    if torch_ok:
      row["torch"] = t
      b = row["jax"]["backbone"]
      row["ratio"] = {k: t[f"{k}_ms"] / b[f"{k}_ms"] for k in ("forward", "forward_backward")}
  result = dict(
      benchmark="text forward / forward+backward, JAX (ours) vs HF transformers Qwen2ForCausalLM (PyTorch)",
      machine=dict(cpu=cpu_model(), cpu_count=os.cpu_count(), platform=platform.platform(),
                   loadavg_before=load_before, loadavg_after=os.getloadavg()),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
                    torch=torch.get("torch"), transformers=torch.get("transformers")),
      jax_device=str(jax.devices()[0]), torch_threads=torch.get("threads"), torch_error=torch.get("error"),
      method=dict(repeats=FLAGS.repeats, warmup=FLAGS.warmup, statistic="median", unit="ms",
                  loss="mean next-token cross-entropy", dtype="float32",
                  batch_and_seq_len="data.global_batch_size x data.seq_len of the config"),
      results=rows)
  out = ROOT / FLAGS.out
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=float) + "\n")
  print(table(rows, torch_ok))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
