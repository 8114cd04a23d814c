"""The frozen model configuration, its validation and the parameter count.

The model modules read only this dataclass; `ModelConfig.from_dict` turns the `model` section of an
ml_collections config into it and checks every invariant before anything compiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

ATTENTION_IMPLS = ("auto", "xla", "chunked", "pallas", "cudnn", "ring")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_KINDS = ("1d", "mrope")
UNPATCHIFY_KINDS = ("spatial", "raster_chunks")
VARIANTS = ("tuna2", "tuna_r")
VISION_POS_RESIZE = ("bilinear", "bicubic")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A configuration value that breaks an invariant; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of the unified model (Qwen2.5-shaped decoder + pixel embeddings)."""
  vocab_size: int = 512
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 1e6
  rms_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = True
  # "1d": the paper's plain RoPE over all tokens; "mrope": Qwen2-VL (t, h, w) sections.
  rope: Literal["1d", "mrope"] = "1d"
  # Rotary frequency pairs per M-RoPE axis (t, h, w); must sum to head_dim // 2. () picks 1/4, 3/8, 3/8.
  mrope_section: tuple[int, ...] = ()
  patch_size: int = 8
  # Width of the sinusoidal timestep features before the TIME-slot MLP.
  time_embed_dim: int = 256
  # Pixel-embedding RMSNorm eps; the release uses torch's default (finfo(float32).eps).
  patch_norm_eps: float = 1.1920929e-07
  dtype: str = "float32"        # activation / compute dtype
  param_dtype: str = "float32"  # master weights
  # Backend (tuna2_jax/kernels/dispatch.py): "auto" picks per platform and mesh and logs the choice.
  attention: Literal["auto", "xla", "chunked", "pallas", "cudnn", "ring"] = "xla"
  attention_chunk: int = 512    # key / query block of the chunked attention
  # Pallas flash-attention blocks; 0 = the per-backend, per-TPU-generation default (kernels/block_sizes.py).
  # TPU needs multiples of 128, Triton powers of two >= 16.
  attention_block_q: int = 0
  attention_block_k: int = 0
  remat: str = "none"
  scan_layers: bool = True
  # Flow head (a DiT-style transformer of width hidden_size over the decoder's final-normed states).
  flow_layers: int = 2
  flow_heads: int = 4
  flow_kv_heads: int = 2
  flow_head_dim: int = 16
  flow_mlp_dim: int = 128
  flow_rms_eps: float = 1e-5          # block RMSNorm eps (the release: 1e-5; QK-norm and final norm 1e-6)
  flow_rope_theta: float = 1e4        # 3-D RoPE on patches (frame, row, col)
  # Rotary pairs per 3-D axis (frame, row, col); must sum to flow_head_dim // 2. () picks 1/4, 3/8, 3/8
  # (the release: 16:24:24 of head_dim 64).
  flow_rope_section: tuple[int, ...] = ()
  flow_text_rope_theta: float = 5e5   # 1-D RoPE on text inside the head (the release: 5e5, llama3 scaling)
  flow_text_rope_scaling: float = 32.0  # llama3 rope_scaling factor of the head's text RoPE; 1 = off
  # "spatial": output token k predicts the patch input token k embedded; "raster_chunks": the release's
  # mapping (token k = p*p consecutive raster-order pixels), needed only to load its weights.
  unpatchify: Literal["spatial", "raster_chunks"] = "spatial"
  # "tuna2": images enter through the patch embedding; "tuna_r": every image (clean or noisy) goes through a
  # SigLIP-shaped ViT (patch size = patch_size) and a connector (RMSNorm -> Linear -> GELU -> Linear).
  variant: Literal["tuna2", "tuna_r"] = "tuna2"
  vision_hidden_size: int = 64
  # Layers of the ViT checkpoint; the encoder keeps those up to vision_feature_layer (-2: all but the last).
  vision_num_layers: int = 3
  vision_feature_layer: int = -2
  vision_num_heads: int = 4
  vision_mlp_dim: int = 128
  vision_ln_eps: float = 1e-6
  # Side of the learned square position table (So400M/16 at 384: 24; the release's Tuna-R at 512: 32).
  vision_pos_grid: int = 4
  # Position-table resize to each image's patch grid: "bilinear" (SigLIP2 NaFlex, antialiased) or "bicubic"
  # (SigLIP's interpolate_pos_encoding, the path the release's Tuna-R runs).
  vision_pos_resize: Literal["bilinear", "bicubic"] = "bilinear"

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"model: unknown field(s) {unknown}")
    kw = dict(d)
    if "mrope_section" in kw:
      kw["mrope_section"] = tuple(kw["mrope_section"])
    if "flow_rope_section" in kw:
      kw["flow_rope_section"] = tuple(kw["flow_rope_section"])
    cfg = cls(**kw)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "patch_size", "time_embed_dim", "attention_chunk")
    for name in positive:
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    for name in ("attention_block_q", "attention_block_k"):
      block = int(getattr(self, name))
      if block < 0 or block % 16:
        raise ConfigError(f"model.{name} must be 0 (default) or a positive multiple of 16, got {block}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                        f"model.num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
    if self.time_embed_dim % 2:
      raise ConfigError(f"model.time_embed_dim ({self.time_embed_dim}) must be even")
    for name, allowed in (("attention", ATTENTION_IMPLS), ("remat", REMAT_POLICIES), ("rope", ROPE_KINDS),
                          ("dtype", DTYPES), ("param_dtype", DTYPES)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} not in {allowed}")
    for name in ("flow_layers", "flow_heads", "flow_kv_heads", "flow_head_dim", "flow_mlp_dim"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.flow_heads % self.flow_kv_heads:
      raise ConfigError(f"model.flow_heads ({self.flow_heads}) must be divisible by "
                        f"model.flow_kv_heads ({self.flow_kv_heads})")
    if self.flow_head_dim % 2:
      raise ConfigError(f"model.flow_head_dim ({self.flow_head_dim}) must be even for rotary embeddings")
    if sum(self.flow_rope_sections) != self.flow_head_dim // 2 or min(self.flow_rope_sections) < 0:
      raise ConfigError(f"model.flow_rope_section {self.flow_rope_section} must be 3 non-negative ints "
                        f"summing to flow_head_dim // 2 = {self.flow_head_dim // 2}")
    if self.flow_text_rope_scaling < 1:
      raise ConfigError(f"model.flow_text_rope_scaling must be >= 1, got {self.flow_text_rope_scaling}")
    if self.unpatchify not in UNPATCHIFY_KINDS:
      raise ConfigError(f"model.unpatchify={self.unpatchify!r} not in {UNPATCHIFY_KINDS}")
    if self.variant not in VARIANTS:
      raise ConfigError(f"model.variant={self.variant!r} not in {VARIANTS}")
    if self.variant == "tuna_r":
      self._validate_vision()
    if self.rope == "mrope" and sum(self.mrope_sections) != self.head_dim // 2:
      raise ConfigError(f"model.mrope_section {self.mrope_section} must sum to head_dim // 2 = "
                        f"{self.head_dim // 2}")

  @property
  def mrope_sections(self) -> tuple[int, int, int]:
    if self.mrope_section:
      return tuple(self.mrope_section)  # type: ignore[return-value]
    half = self.head_dim // 2
    hw = half * 3 // 8
    return (half - 2 * hw, hw, hw)

  @property
  def flow_rope_sections(self) -> tuple[int, int, int]:
    if self.flow_rope_section:
      if len(self.flow_rope_section) != 3:
        raise ConfigError(f"model.flow_rope_section needs 3 entries, got {self.flow_rope_section}")
      return tuple(self.flow_rope_section)  # type: ignore[return-value]
    half = self.flow_head_dim // 2
    hw = half * 3 // 8
    return (half - 2 * hw, hw, hw)

  def _validate_vision(self) -> None:
    for name in ("vision_hidden_size", "vision_num_layers", "vision_num_heads", "vision_mlp_dim",
                 "vision_pos_grid"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.vision_hidden_size % self.vision_num_heads:
      raise ConfigError(f"model.vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
                        f"model.vision_num_heads ({self.vision_num_heads})")
    if not 1 <= self.vision_kept_layers <= self.vision_num_layers:
      raise ConfigError(f"model.vision_feature_layer={self.vision_feature_layer} keeps "
                        f"{self.vision_kept_layers} of the model.vision_num_layers="
                        f"{self.vision_num_layers} layers")
    if self.vision_pos_resize not in VISION_POS_RESIZE:
      raise ConfigError(f"model.vision_pos_resize={self.vision_pos_resize!r} not in {VISION_POS_RESIZE}")

  @property
  def vision_kept_layers(self) -> int:
    """ViT layers the encoder runs: feature layer -k keeps all but the last k - 1 (HF hidden_states[-k])."""
    f = self.vision_feature_layer
    return f + 1 if f >= 0 else self.vision_num_layers + f + 1

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3


def count_text_params(cfg: ModelConfig) -> int:
  """Parameters of the Qwen2.5 text backbone (embeddings, decoder, final norm, LM head)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0)
  mlp = 3 * d * cfg.mlp_dim
  layer = attn + mlp + 2 * d
  embed = cfg.vocab_size * d
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  return embed + cfg.num_layers * layer + d + head


def count_multimodal_params(cfg: ModelConfig) -> int:
  """Parameters Tuna-2 adds to the text backbone: pixel embedding and the TIME-slot MLP."""
  d = cfg.hidden_size
  patch = cfg.patch_dim * d + d + d  # linear + bias + RMSNorm
  time = cfg.time_embed_dim * d + d + d * d + d
  return patch + time
