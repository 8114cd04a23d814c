"""Where the HF Qwen2 golden fixtures live (tests/golden, or $TUNA2_GOLDEN_DIR for a live parity run)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from safetensors.numpy import load_file

GOLDEN_DIR = pathlib.Path(os.environ.get("TUNA2_GOLDEN_DIR", pathlib.Path(__file__).parents[1] / "golden"))


def qwen2_fixtures() -> list[str]:
  """Names of the Qwen2 fixtures (other models' fixtures share the directory)."""
  names = []
  for golden in sorted(GOLDEN_DIR.glob("*/golden.safetensors")):
    config = golden.parent / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen2":
      names.append(golden.parent.name)
  # The fixtures are committed: none found is a broken checkout or a wrong TUNA2_GOLDEN_DIR, not a skip.
  assert len(names) >= 2, f"expected the Qwen2 golden fixtures under {GOLDEN_DIR}, found {names}"
  return names


def golden(name: str) -> tuple[np.ndarray, np.ndarray]:
  """HF's input tokens int32 [B, L] and float32 logits [B, L, V] of fixture `name`."""
  g = load_file(GOLDEN_DIR / name / "golden.safetensors")
  return g["tokens"], g["logits"]
