"""Loads each exported directory with transformers and compares its logits with the golden ones.

Runs in the parity venv (torch + transformers), never imports tuna2_jax:

  .venv-parity/bin/python tests/golden/check_export.py --golden=tests/golden --export=/tmp/export

For every Qwen2 fixture `GOLDEN/<name>/` (golden.safetensors, config.json with model_type qwen2; other
fixtures living beside them are skipped) there must be an `EXPORT/<name>/` written by
`tuna2_jax.convert.hf_qwen2.export_hf`; exits non-zero when one is missing or its logits differ.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

ATOL = 1e-4  # float32; the export must reproduce HF's own logits


def check(name: str, golden: pathlib.Path, export: pathlib.Path) -> str | None:
  """None when the export matches, else what is wrong."""
  if not export.is_dir():
    return f"{name}: no export at {export}"
  ref = load_file(str(golden / "golden.safetensors"))
  model = Qwen2ForCausalLM.from_pretrained(export, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(input_ids=ref["tokens"].long()).logits.float()
  if logits.shape != ref["logits"].shape:
    return f"{name}: logits shape {tuple(logits.shape)}, golden {tuple(ref['logits'].shape)}"
  err = (logits - ref["logits"]).abs().max().item()
  print(f"{name}: max |logits - golden| = {err:.2e} (atol {ATOL})")
  return None if err <= ATOL else f"{name}: max abs error {err:.3e} > {ATOL}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--golden", required=True)
  parser.add_argument("--export", required=True)
  args = parser.parse_args()
  golden, export = pathlib.Path(args.golden), pathlib.Path(args.export)
  names = sorted(p.parent.name for p in golden.glob("*/golden.safetensors")
                 if (p.parent / "config.json").is_file()
                 and json.loads((p.parent / "config.json").read_text()).get("model_type") == "qwen2")
  if not names:
    sys.exit(f"no Qwen2 fixtures (*/golden.safetensors) under {golden}")
  failures = [f for n in names if (f := check(n, golden / n, export / n))]
  for f in failures:
    print("FAIL", f, file=sys.stderr)
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
