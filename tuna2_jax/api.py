"""The user API: load a pretrained model from a directory and run it.

  model = tuna2_jax.api.from_pretrained("path/to/Qwen2.5-0.5B")   # or a native exported checkpoint
  logits = model.text_logits(tokens)                              # int32 [B, L] -> float32 [B, L, V]

Recognised directories: a native exported checkpoint (config.json + params.safetensors, written by
`tuna2_jax.convert.hf_qwen2.save_native` or its `import` command), a Hugging Face Qwen2 / Qwen2.5
`save_pretrained` directory (config.json with model_type "qwen2" + model.safetensors or its shard index),
and a training workdir (its checkpoints/, or one checkpoints/<step>): parameters only, the optimizer is never
read.

  model = tuna2_jax.api.from_pretrained("runs/tiny", step=2000, ema=True, dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from tuna2_jax import checkpoint, sample, sequence
from tuna2_jax.convert import hf_qwen2
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A model configuration and its parameters (the nested "params" collection of Tuna2)."""
  config: ModelConfig
  params: Any
  # For a Hugging Face import: which parameters came from the checkpoint and which are fresh.
  report: hf_qwen2.ImportReport | None = None
  # The tokenizer's structural ids (BOS, EOS, BOI, EOI, image placeholder) the generation methods use.
  special: sequence.SpecialTokens = sequence.SpecialTokens()

  @functools.cached_property
  def _text_logits(self) -> Callable[[Any, dict[str, np.ndarray]], jax.Array]:
    model = Tuna2(self.config)
    return jax.jit(lambda params, batch: model.apply({"params": params}, batch, flow=False).logits)

  def text_logits(self, tokens: np.ndarray | jax.Array) -> jax.Array:
    """Next-token logits float32 [B, L, vocab] for text tokens int32 [B, L], one causal document a row."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be integer [B, L], got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, "
                       f"{tokens.max()}]")
    return self._text_logits(self.params, sequence.text_batch(tokens, self.config.patch_size))

  def generate_text(self, prompt_tokens, **kwargs) -> list[list[int]]:
    """New token ids per prompt (KV cache; `images=`, `max_new_tokens`, `temperature`, `top_p`, `seed`)."""
    return sample.generate_text(self.params, self.config, prompt_tokens, special=self.special, **kwargs)

  def generate_image(self, prompt_tokens, *, height: int, width: int, **kwargs) -> np.ndarray:
    """uint8 [B, H, W, 3] (`steps`, `cfg_scale`, `sampler`, `seed`, `source_image=` for editing)."""
    return sample.generate_image(self.params, self.config, prompt_tokens, height=height, width=width,
                                 special=self.special, **kwargs)

  def reconstruct(self, image: np.ndarray, **kwargs) -> np.ndarray:
    """The image regenerated from itself (for reconstruction PSNR)."""
    return sample.reconstruct(self.params, self.config, image, special=self.special, **kwargs)


def from_pretrained(path: str | pathlib.Path, *, dtype: str | None = None, seed: int = 0,
                    step: int | None = None, ema: bool = False) -> Pretrained:
  """Loads a native exported checkpoint, a Hugging Face Qwen2 directory or a training workdir.

  dtype: run the model in it (e.g. "bfloat16"; parameters are cast); None keeps the stored precision
  (float32 for Hugging Face imports). seed: initialises the parameters a Qwen2 checkpoint lacks
  (patch and timestep embeddings, the flow head); it is unused for native checkpoints.
  step, ema (training workdirs only): which step (None: the latest intact one), and the EMA parameters
  instead of the raw ones (an error when the run kept no EMA).
  """
  path = pathlib.Path(path)
  config = path / "config.json"
  if _is_training_dir(path):
    cfg, params = checkpoint.restore_params(path, step, dtype, ema=ema)
    return Pretrained(cfg, params)
  if step is not None or ema:
    raise ValueError(f"{path}: step= and ema= apply to training workdirs only (checkpoints/<step>/state)")
  if (path / hf_qwen2.NATIVE_PARAMS).is_file() and config.is_file():
    cfg, params = hf_qwen2.load_native(path, dtype=dtype)
    return Pretrained(cfg, params)
  has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
  if config.is_file() and has_weights and json.loads(config.read_text()).get("model_type") == "qwen2":
    cfg, params, report = hf_qwen2.import_hf(path, seed=seed, dtype=dtype)
    return Pretrained(cfg, params, report)
  found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
  raise ValueError(
      f"{path}: not a pretrained model. Expected a native checkpoint (config.json + "
      f"{hf_qwen2.NATIVE_PARAMS}), a Hugging Face Qwen2 directory (config.json with model_type 'qwen2' "
      f"+ model.safetensors or model.safetensors.index.json) or a training workdir (checkpoints/<step>/); "
      f"found: {found}")


def _is_training_dir(path: pathlib.Path) -> bool:
  """A run's workdir, its checkpoints/ directory, or one checkpoints/<step> directory."""
  if path.name.isdigit() and (path / "state").is_dir():
    return True
  root = path if path.name == "checkpoints" else path / "checkpoints"
  return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())
