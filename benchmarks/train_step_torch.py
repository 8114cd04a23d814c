"""The PyTorch side of benchmarks/train_step.py: HF transformers Qwen2ForCausalLM + torch.optim.AdamW on CPU.

Runs in the parity venv (torch + transformers); train_step.py starts it as a subprocess:

  .venv-parity/bin/python benchmarks/train_step_torch.py --cases='[{"name": "debug", "batch": 4, ...}]'

One step is what our train step does on a text-only batch: zero the grads, forward, mean next-token
cross-entropy, backward, clip the global grad norm to 1.0, AdamW (betas 0.9/0.95, eps 1e-8, weight decay
0.01) update. float32 throughout. Prints one JSON line: versions and, per case, every step's time in ms and
their median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM


def run_case(case: dict, *, warmup: int, repeats: int) -> dict:
  cfg = Qwen2Config(
      vocab_size=case["vocab_size"], hidden_size=case["hidden_size"], num_hidden_layers=case["num_layers"],
      num_attention_heads=case["num_heads"], num_key_value_heads=case["num_kv_heads"],
      head_dim=case["head_dim"], intermediate_size=case["mlp_dim"],
      tie_word_embeddings=case["tie_embeddings"], rms_norm_eps=case["rms_eps"],
      rope_parameters={"rope_type": "default", "rope_theta": case["rope_theta"]},
      attn_implementation=case.get("attn_implementation", "sdpa"), dtype="float32", use_cache=False)
  torch.manual_seed(0)
  model = Qwen2ForCausalLM(cfg)
  model.train()  # Qwen2 has no dropout by default (attention_dropout=0), so train() changes no numerics
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
  tokens = torch.randint(0, case["vocab_size"], (case["batch"], case["seq_len"]))

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()  # .item() waits for the result

  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    times.append(1e3 * (time.perf_counter() - t0))
  return dict(name=case["name"], attn_implementation=cfg._attn_implementation,
              params=sum(p.numel() for p in model.parameters()), step_times_ms=times,
              step_ms=statistics.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", required=True, help="JSON list of shape dicts (see train_step.py)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: torch's default")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  results = [run_case(c, warmup=args.warmup, repeats=args.repeats) for c in json.loads(args.cases)]
  print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__,
                        threads=torch.get_num_threads(), results=results)))


if __name__ == "__main__":
  main()
