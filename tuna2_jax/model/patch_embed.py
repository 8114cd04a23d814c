"""Pixel embeddings: the patch projection + RMSNorm of the release, and the TIME-slot timestep embedding."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import RMSNorm, dense, dtype_of


def normalize_pixels(patches: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
  return patches.astype(jnp.float32) / 127.5 - 1.0


def denormalize_pixels(x: jax.Array) -> jax.Array:
  """float [-1, 1] -> uint8, clipped and rounded."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class PatchEmbed(nn.Module):
  """A p x p stride-p projection of a flattened patch (a linear map with bias), then RMSNorm.

  Equivalent to the release's Conv2d(3, D, k=p, s=p) with the kernel flattened as (row, col, channel).
  Per-token RMSNorm also removes the scale of noisy inputs; t reaches the model through the TIME slot.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, L, p*p*3] in [-1, 1] -> [B, L, D]."""
    cfg = self.cfg
    x = dense(cfg.hidden_size, ("patch", "embed"), cfg=cfg, use_bias=True, name="proj",
              kernel_init=nn.initializers.xavier_uniform())(pixels.astype(dtype_of(cfg.dtype)))
    return RMSNorm(cfg.patch_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="norm")(x)


def timestep_features(t: jax.Array, dim: int, max_period: float = 1e4) -> jax.Array:
  """Sinusoidal features [..., dim] of raw t in [0, 1], [cos, sin] order as in the release."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbed(nn.Module):
  """sinusoidal(t) -> Linear -> SiLU -> Linear; written into each image's TIME slot."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    cfg = self.cfg
    h = timestep_features(t, cfg.time_embed_dim).astype(dtype_of(cfg.dtype))
    h = dense(cfg.hidden_size, ("time", "mlp"), cfg=cfg, use_bias=True, name="fc1")(h)
    return dense(cfg.hidden_size, ("mlp", "embed"), cfg=cfg, use_bias=True, name="fc2")(nn.silu(h))
