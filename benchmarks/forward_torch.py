"""The PyTorch side of benchmarks/forward.py: HF transformers Qwen2ForCausalLM on CPU at given shapes.

Runs in the parity venv (torch + transformers); forward.py starts it as a subprocess:

  .venv-parity/bin/python benchmarks/forward_torch.py --cases='[{"name": "debug", "batch": 4, ...}]'

Prints one JSON line: versions and, per case, the forward and forward+backward times in ms (each run and
their median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM


def times_ms(fn, *, warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - t0))
  return times


def qwen2_model(case: dict) -> Qwen2ForCausalLM:
  """A random-weight float32 Qwen2ForCausalLM of the case's shapes (seeded)."""
  cfg = Qwen2Config(
      vocab_size=case["vocab_size"], hidden_size=case["hidden_size"], num_hidden_layers=case["num_layers"],
      num_attention_heads=case["num_heads"], num_key_value_heads=case["num_kv_heads"],
      head_dim=case["head_dim"], intermediate_size=case["mlp_dim"],
      tie_word_embeddings=case["tie_embeddings"], rms_norm_eps=case["rms_eps"],
      rope_parameters={"rope_type": "default", "rope_theta": case["rope_theta"]},
      attn_implementation=case.get("attn_implementation", "sdpa"), dtype="float32", use_cache=False)
  torch.manual_seed(0)
  return Qwen2ForCausalLM(cfg)


def run_case(case: dict, *, warmup: int, repeats: int) -> dict:
  model = qwen2_model(case)
  cfg = model.config
  tokens = torch.randint(0, case["vocab_size"], (case["batch"], case["seq_len"]))

  def forward():
    with torch.no_grad():
      model(input_ids=tokens).logits.sum().item()  # .item() waits for the result

  def forward_backward():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()

  model.eval()  # no dropout; autograd still on for forward_backward
  out = dict(name=case["name"], attn_implementation=cfg._attn_implementation)
  for key, fn in (("forward", forward), ("forward_backward", forward_backward)):
    out[f"{key}_times_ms"] = times_ms(fn, warmup=warmup, repeats=repeats)
    out[f"{key}_ms"] = statistics.median(out[f"{key}_times_ms"])
  return out


def main(run=None, *, warmup: int = 2, repeats: int = 7) -> None:
  """The command line shared by the torch sides: --cases (JSON) -> one JSON line of results."""
  doc = sys.modules["__main__"].__doc__ or __doc__
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--cases", required=True, help="JSON list of shape dicts")
  parser.add_argument("--warmup", type=int, default=warmup)
  parser.add_argument("--repeats", type=int, default=repeats)
  parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: torch's default")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  run = run or run_case
  results = [run(c, warmup=args.warmup, repeats=args.repeats) for c in json.loads(args.cases)]
  print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__,
                        threads=torch.get_num_threads(), results=results)))


if __name__ == "__main__":
  main()
