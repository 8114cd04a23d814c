"""The flow head: a DiT-style transformer from the decoder's final-normed states to clean pixels x̂.

As in the release (tuna2.md §1.7): N blocks of pre-RMSNorm attention + SwiGLU with adaLN-Zero, where the
shift / scale / gate come from SiLU -> Linear of each image's TIME embedding and apply only inside image spans
(the TIME slot and the patches); text positions are plain pre-norm blocks (shift = scale = 0, gate = 1).
Attention has no bias, QK-RMSNorm, the decoder's hybrid mask, 3-D RoPE (frame, row, col) on patches, 1-D
RoPE on text and none on TIME (§1.4). A zero-initialised final adaLN + linear maps to p*p*3 pixel values,
so x̂ = 0 at init. The head runs over the whole row; only image positions are read.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax import sequence
from tuna2_jax.model import kv_cache
from tuna2_jax.model.attention import attend
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import MLP, RMSNorm, apply_rope, constrain, dense, dtype_of, logical_init
from tuna2_jax.model.transformer import REMAT_POLICIES

# The release's head text RoPE uses llama3 rope_scaling with these fixed companions of the factor.
_LLAMA3_ORIGINAL_MAX, _LLAMA3_LOW_FREQ, _LLAMA3_HIGH_FREQ = 8192, 1.0, 4.0
_QK_NORM_EPS, _FINAL_NORM_EPS = 1e-6, 1e-6


def llama3_frequencies(head_dim: int, theta: float, factor: float) -> jax.Array:
  """Inverse frequencies [head_dim / 2] with llama3 rope scaling (factor 1 = plain RoPE)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if factor == 1.0:
    return inv_freq
  low_wavelen = _LLAMA3_ORIGINAL_MAX / _LLAMA3_LOW_FREQ
  high_wavelen = _LLAMA3_ORIGINAL_MAX / _LLAMA3_HIGH_FREQ
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (_LLAMA3_ORIGINAL_MAX / wavelen - _LLAMA3_LOW_FREQ) / (_LLAMA3_HIGH_FREQ - _LLAMA3_LOW_FREQ)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def head_rope_tables(positions: jax.Array, modality: jax.Array, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Rotation tables of the head, identity where a kind does not apply.

  text_cos/sin [B, L, D]: rotate-half 1-D RoPE at the document position (text only).
  patch_cos/sin [B, L, D]: interleaved-pair 3-D RoPE at (frame 0, row, col), each axis with its own
  frequencies over its section (patches only). TIME and padding get neither.
  """
  hd = cfg.flow_head_dim
  is_text = (modality == sequence.TEXT)[..., None]
  is_patch = (modality == sequence.PATCH)[..., None]
  inv = llama3_frequencies(hd, cfg.flow_text_rope_theta, cfg.flow_text_rope_scaling)
  ang = positions[:, 0, :, None].astype(jnp.float32) * inv
  ang = jnp.where(is_text, jnp.concatenate([ang, ang], -1), 0.0)
  tables = dict(text_cos=jnp.cos(ang), text_sin=jnp.sin(ang))
  axis_angles = []
  # Frame 0 for every image (no video); rows and columns from the contract's positions[1:].
  for axis, pairs in zip((None, 1, 2), cfg.flow_rope_sections, strict=False):
    freqs = 1.0 / (cfg.flow_rope_theta ** (jnp.arange(0, 2 * pairs, 2, dtype=jnp.float32) / (2 * pairs)))
    pos = (jnp.zeros_like(positions[:, 0]) if axis is None else positions[:, axis]).astype(jnp.float32)
    axis_angles.append(pos[..., None] * freqs)
  ang = jnp.repeat(jnp.concatenate(axis_angles, -1), 2, axis=-1)  # pair j -> dims 2j, 2j+1
  ang = jnp.where(is_patch, ang, 0.0)
  tables.update(patch_cos=jnp.cos(ang), patch_sin=jnp.sin(ang))
  return tables


def apply_interleaved_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotation of interleaved pairs by -angle, as the release's SDPA path does (tuna2.md §1.4):
  (x0, x1) -> (x0 cos + x1 sin, -x0 sin + x1 cos). x [B, L, H, D], tables [B, L, D]."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], -1, 2)
  swapped = jnp.stack([pairs[..., 1], -pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos[:, :, None] + swapped * sin[:, :, None]).astype(x.dtype)


def head_rope(x: jax.Array, tables: dict[str, jax.Array]) -> jax.Array:
  # Each position is rotated by at most one of the two tables; the other is the identity there.
  x = apply_rope(x, tables["text_cos"], tables["text_sin"])
  return apply_interleaved_rope(x, tables["patch_cos"], tables["patch_sin"])


class QKNorm(nn.Module):
  """RMSNorm over head_dim (per head), float32 math."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, ("head_dim",)), (x.shape[-1],),
                       dtype_of(self.cfg.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + _QK_NORM_EPS)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift in float32 (as the release)."""
  return (x.astype(jnp.float32) * (1.0 + scale) + shift).astype(x.dtype)


def adaln(cond: jax.Array, span: jax.Array, n: int, cfg: ModelConfig, name: str) -> list[jax.Array]:
  """n modulation vectors [B, L, D] from SiLU -> zero-init Linear of the TIME embedding, zero outside spans.

  The kernel [D, n, D] reads the conditioning like an MLP down-projection, hence ("mlp", None, "embed").
  """
  d = cond.shape[-1]
  mods = dense((n, d), ("mlp", None, "embed"), cfg=cfg, use_bias=True, name=name,
               kernel_init=nn.initializers.zeros)(nn.silu(cond))
  mods = mods.astype(jnp.float32) * span[..., None, None]
  return [mods[..., i, :] for i in range(n)]


class FlowAttention(nn.Module):
  """Unbiased GQA attention with QK-RMSNorm and the head's RoPE; optional KV buffer for inference."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, ctx, kv):
    cfg = self.cfg
    q = dense((cfg.flow_heads, cfg.flow_head_dim), ("embed", "heads", "head_dim"), cfg=cfg, name="q")(x)
    k = dense((cfg.flow_kv_heads, cfg.flow_head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg, name="k")(x)
    v = dense((cfg.flow_kv_heads, cfg.flow_head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg, name="v")(x)
    q = head_rope(QKNorm(cfg, name="q_norm")(q), ctx["rope"])
    k = head_rope(QKNorm(cfg, name="k_norm")(k), ctx["rope"])
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    if kv is None:
      out = attend(q, k, v, segment_ids=ctx["segment_ids"], attn_end=ctx["attn_end"], cfg=cfg)
    else:
      kv = (kv_cache.write(kv[0], k, ctx["start"]), kv_cache.write(kv[1], v, ctx["start"]))
      out = kv_cache.masked_attention(q, kv[0], kv[1], q_attn_end=ctx["attn_end"],
                                      q_segment=ctx["segment_ids"], k_segment=ctx["k_segment"])
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return dense(x.shape[-1], ("heads", "head_dim", "embed"), cfg=cfg, axis=(-2, -1), name="o")(out), kv


class FlowBlock(nn.Module):
  """h = x + g1 * attn(mod(norm(x))); h + g2 * mlp(mod(norm(h))), modulation only inside image spans."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, ctx, kv):
    cfg = self.cfg
    span = ctx["span"]
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln(ctx["cond"], span, 6, cfg, "adaln")
    gate1 = jnp.where(span[..., None], gate1, 1.0)
    gate2 = jnp.where(span[..., None], gate2, 1.0)
    norm = lambda name: RMSNorm(cfg.flow_rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
    h, kv = FlowAttention(cfg, name="attn")(modulate(norm("attn_norm")(x), shift1, scale1), ctx, kv)
    x = constrain(x + (gate1 * h).astype(x.dtype), ("batch", "length", "embed"))
    h = MLP(cfg, cfg.flow_mlp_dim, name="mlp")(modulate(norm("mlp_norm")(x), shift2, scale2))
    x = constrain(x + (gate2 * h).astype(x.dtype), ("batch", "length", "embed"))
    return x, kv


class FlowHead(nn.Module):
  """hidden [B, L, D] (+ per-position TIME embedding) -> x̂ [B, L, p*p*3] in output-token layout."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, *, cond: jax.Array, modality: jax.Array, positions: jax.Array,
               segment_ids: jax.Array, attn_end: jax.Array, cache: kv_cache.KVCache | None = None,
               k_segment: jax.Array | None = None,
               start: jax.Array | int = 0) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """cond [B, L, D]: the TIME embedding of each position's image (t must be constant over a span).
    With `cache` the rows are the chunk [start, start + L) of longer rows whose key segments are
    `k_segment`."""
    cfg = self.cfg
    span = (modality == sequence.TIME) | (modality == sequence.PATCH)
    ctx = dict(cond=cond, span=span, rope=head_rope_tables(positions, modality, cfg),
               segment_ids=segment_ids, attn_end=attn_end, k_segment=k_segment, start=start)
    kv = None if cache is None else (cache.k, cache.v)
    x = hidden
    block = FlowBlock
    if cfg.remat != "none" and cache is None:
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, 0), length=cfg.flow_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, kv = stack(cfg, name="layers")(x, ctx, kv)
    else:
      outs = []
      for i in range(cfg.flow_layers):
        x, kv_i = block(cfg, name=f"layers_{i}")(x, ctx, None if kv is None else (kv[0][i], kv[1][i]))
        outs.append(kv_i)
      kv = None if kv is None else (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs]))
    x = RMSNorm(_FINAL_NORM_EPS, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="final_norm")(x)
    shift, scale = adaln(cond, span, 2, cfg, "final_adaln")
    x = modulate(x, shift, scale)
    out = dense(cfg.patch_dim, ("embed", "patch"), cfg=cfg, use_bias=True, name="out",
                kernel_init=nn.initializers.zeros)(x)
    return out.astype(jnp.float32), None if kv is None else kv_cache.KVCache(k=kv[0], v=kv[1])


def output_to_patches(x: jax.Array, *, modality: jax.Array, positions: jax.Array, attn_end: jax.Array,
                      patch_size: int, offset: jax.Array | int = 0) -> jax.Array:
  """The release's raster-chunk output layout -> spatial patches (the contract's `patchify` order).

  In the release (tuna2.md §1.8) output token k of an image holds raster-order pixels [k p², (k+1) p²) of
  the whole image (channels last), not the patch input token k embedded. Spatial element (p1, p2, c) of
  patch (r, col) is pixel (r p + p1, col p + p2) of an image W = w p wide; it lives in output token
  f // p² at element (f % p²) * 3 + c, f = its raster index. x [B, S, p*p*3] are rows whose absolute
  indices start at `offset` (attn_end is absolute); non-patch positions are returned unchanged.
  """
  b, s, e = x.shape
  p = patch_size
  idx = jnp.arange(s)
  last = attn_end - offset                                           # chunk index of the image's last patch
  last_c = jnp.clip(last, 0, s - 1)
  h = jnp.take_along_axis(positions[:, 1], last_c, axis=1) + 1       # grid of the image of each position
  w = jnp.take_along_axis(positions[:, 2], last_c, axis=1) + 1
  first = last - h * w + 1
  e_idx = jnp.arange(e)
  p1, p2, c = e_idx // (3 * p), (e_idx // 3) % p, e_idx % 3
  row = positions[:, 1, :, None] * p + p1                             # [B, S, E]
  col = positions[:, 2, :, None] * p + p2
  f = row * (w[..., None] * p) + col
  src_tok = first[..., None] + f // (p * p)
  src_el = (f % (p * p)) * 3 + c
  is_patch = (modality == sequence.PATCH)[..., None]
  src = jnp.where(is_patch, jnp.clip(src_tok, 0, s - 1) * e + src_el, idx[None, :, None] * e + e_idx)
  return jnp.take_along_axis(x.reshape(b, s * e), src.reshape(b, s * e), axis=1).reshape(b, s, e)
