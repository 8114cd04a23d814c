"""Golden fixtures: random-weight HF `Qwen2ForCausalLM` models and their float32 logits.

Runs in the parity venv (torch + transformers), never imports tuna2_jax, needs no network:

  .venv-parity/bin/python tests/golden/make_golden.py --out=tests/golden

Writes `OUT/<name>/` (save_pretrained: config.json + model.safetensors) and `OUT/<name>/golden.safetensors`
holding `tokens` int32 [B, L] and HF's `logits` float32 [B, L, V].
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

# Odd sizes on purpose: GQA 3:1 with tied embeddings, and GQA 2:1 untied with head_dim != hidden / heads.
FIXTURES = {
    "qwen2_gqa3_tied": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        intermediate_size=80, vocab_size=97, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    "qwen2_gqa2_untied_hd12": dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        intermediate_size=72, vocab_size=131, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
}
BATCH, LENGTH = 2, 11


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Weights at a scale that gives O(1) logits; norm weights and biases away from their 1 / 0 defaults."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_(0.5 * noise)
      else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
        p.copy_(noise / p.shape[1] ** 0.5)


def make(name: str, out: pathlib.Path, seed: int) -> None:
  kw = FIXTURES[name]
  cfg = Qwen2Config(**kw, attn_implementation="eager", dtype="float32")
  torch.manual_seed(seed)
  model = Qwen2ForCausalLM(cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  randomize_(model, gen)
  tokens = torch.randint(0, kw["vocab_size"], (BATCH, LENGTH), generator=gen)
  with torch.no_grad():
    logits = model(input_ids=tokens).logits.float()
  d = out / name
  d.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(d, safe_serialization=True)
  save_file({"tokens": tokens.to(torch.int32).contiguous(), "logits": logits.contiguous()},
            str(d / "golden.safetensors"))
  print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {tuple(logits.shape)}, "
        f"|logits| max {logits.abs().max():.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  torch.set_default_dtype(torch.float32)
  for i, name in enumerate(FIXTURES):
    make(name, pathlib.Path(args.out), args.seed + i)


if __name__ == "__main__":
  main()
