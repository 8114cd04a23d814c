"""The PyTorch side of benchmarks/train_step.py: HF transformers Qwen2ForCausalLM + torch.optim.AdamW on CPU.

Runs in the parity venv (torch + transformers); train_step.py starts it as a subprocess:

  .venv-parity/bin/python benchmarks/train_step_torch.py --cases='[{"name": "debug", "batch": 4, ...}]'

One step is what our train step does on a text-only batch: zero the grads, forward, mean next-token
cross-entropy, backward, clip the global grad norm to 1.0, AdamW (betas 0.9/0.95, eps 1e-8, weight decay
0.01) update. float32 throughout. Prints one JSON line: versions and, per case, every step's time in ms and
their median.
"""

from __future__ import annotations

import statistics

import forward_torch  # a sibling script: this file runs as `python benchmarks/train_step_torch.py`
import torch
from forward_torch import qwen2_model, times_ms


def run_case(case: dict, *, warmup: int, repeats: int) -> dict:
  model = qwen2_model(case)
  cfg = model.config
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

  times = times_ms(step, warmup=warmup, repeats=repeats)
  return dict(name=case["name"], attn_implementation=cfg._attn_implementation,
              params=sum(p.numel() for p in model.parameters()), step_times_ms=times,
              step_ms=statistics.median(times))


if __name__ == "__main__":
  forward_torch.main(run_case, warmup=1, repeats=3)
