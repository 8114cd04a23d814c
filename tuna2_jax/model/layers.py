"""Building blocks shared by the decoder and the heads: RMSNorm, SwiGLU MLP, rotary embeddings.

Every parameter carries logical axis names (see `tuna2_jax.sharding`), never mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax.model.config import ModelConfig

Dtype = jnp.dtype


def dtype_of(name: str) -> Dtype:
  return jnp.dtype(name)


def logical_init(init: nn.initializers.Initializer, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint by logical names (a no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(names))


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, as Qwen2 does, then cast back."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class DenseGeneral(nn.Module):
  """y = x . W (+ b) contracting `axis` of x with the leading axes of W [*in, *features].

  Our own instead of flax's DenseGeneral, which initialises a flattened 2-D kernel: a logical-partitioning
  constraint of the full rank cannot apply to that flat value under a mesh.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(a % x.ndim for a in self.axis)
    shape = tuple(x.shape[a] for a in axis) + self.features
    kernel = self.param("kernel", logical_init(self.kernel_init, self.names), shape, self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, self.names[-len(self.features):]),
                        self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(features: int | tuple[int, ...], names: Sequence[str | None], *, cfg: ModelConfig,
          use_bias: bool = False, axis: int | tuple[int, ...] = -1, name: str | None = None,
          kernel_init: nn.initializers.Initializer | None = None) -> DenseGeneral:
  """A DenseGeneral whose kernel has logical names `names` (input axes first, then outputs)."""
  return DenseGeneral(
      features=(features,) if isinstance(features, int) else tuple(features), names=tuple(names),
      axis=(axis,) if isinstance(axis, int) else tuple(axis), use_bias=use_bias, dtype=dtype_of(cfg.dtype),
      param_dtype=dtype_of(cfg.param_dtype), kernel_init=kernel_init or nn.initializers.normal(0.02),
      name=name)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  mlp_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mlp_dim = self.mlp_dim or self.cfg.mlp_dim
    gate = dense(mlp_dim, ("embed", "mlp"), cfg=self.cfg, name="gate")(x)
    up = dense(mlp_dim, ("embed", "mlp"), cfg=self.cfg, name="up")(x)
    h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), cfg=self.cfg, name="down")(h)


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings (rotate-half layout, as HF Qwen2 / Qwen2-VL).


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_tables(positions: jax.Array, *, head_dim: int, theta: float,
                sections: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [B, L, head_dim] in float32.

  positions: [B, L] for 1-D RoPE, or [B, 3, L] with `sections` (pairs per axis) for M-RoPE, where
  frequency band k takes its angle from the axis whose section holds k.
  """
  inv_freq = rope_frequencies(head_dim, theta)                       # [hd/2]
  if sections is None:
    angles = positions[..., None].astype(jnp.float32) * inv_freq     # [B, L, hd/2]
  else:
    axis_of_band = jnp.repeat(jnp.arange(len(sections)), jnp.array(sections),
                              total_repeat_length=head_dim // 2)
    pos = jnp.moveaxis(positions, -2, -1).astype(jnp.float32)       # [B, L, 3]
    angles = pos[..., axis_of_band] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, L, H, D] rotated by tables [B, L, D] (float32 math, cast back)."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
