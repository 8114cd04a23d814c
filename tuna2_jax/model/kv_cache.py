"""Key/value caches for inference: masked attention of a chunk of queries against a fixed-size key buffer.

A cache holds the keys and values of every position of a row written so far, in a buffer of fixed length C
(so decoding loops compile once). A chunk of S positions [start, start + S) writes its keys at `start` and
attends to the whole buffer under the contract's rule, `allowed(q, k) = seg[q] == seg[k] != 0 and
k <= attn_end[q]`, with absolute indices: keys not written yet lie after every query's `attn_end` (or hold
segment 0), so they are never read. `CachedDecoder` mirrors `transformer.Decoder` parameter for parameter,
so the same params run with or without a cache.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import MLP, RMSNorm, apply_rope, dense, dtype_of

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values [layers, B, C, Hkv, D] of one transformer stack."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, layers: int, batch: int, length: int, kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> KVCache:
    shape = (layers, batch, length, kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write(buffer: jax.Array, new: jax.Array, start: jax.Array | int) -> jax.Array:
  """buffer [B, C, ...] with new [B, S, ...] written at [start, start + S)."""
  idx = (0, start) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), idx)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_attn_end: jax.Array,
                     q_segment: jax.Array, k_segment: jax.Array) -> jax.Array:
  """q [B, S, Hq, D] against a buffer k/v [B, C, Hkv, D] whose key i sits at absolute index i."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, s, hkv, hq // hkv, d).astype(jnp.float32) * d ** -0.5
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32))
  k_idx = jnp.arange(k.shape[1])
  mask = ((q_segment[:, :, None] == k_segment[:, None, :]) & (q_segment[:, :, None] != 0)
          & (k_idx[None, None, :] <= q_attn_end[:, :, None]))[:, None, None]
  logits = jnp.where(mask, logits, _MASK_VALUE)
  p = jnp.exp(logits - logits.max(-1, keepdims=True)) * mask
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
  return out.reshape(b, s, hq, d).astype(q.dtype)


class CachedAttention(nn.Module):
  """`attention.Attention` (same parameter names and shapes) reading and writing a KV buffer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, cos, sin, attn_end, segment_ids, k_segment, k_buf, v_buf, start):
    cfg = self.cfg
    q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="q")(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="k")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="v")(x)
    k_buf = write(k_buf, apply_rope(k, cos, sin), start)
    v_buf = write(v_buf, v, start)
    out = masked_attention(apply_rope(q, cos, sin), k_buf, v_buf, q_attn_end=attn_end,
                           q_segment=segment_ids, k_segment=k_segment)
    out = dense(x.shape[-1], ("heads", "head_dim", "embed"), cfg=cfg, axis=(-2, -1), name="o")(out)
    return out, k_buf, v_buf


class CachedDecoderBlock(nn.Module):
  """`transformer.DecoderBlock` with a KV buffer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, ctx, kv):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
    h, k_buf, v_buf = CachedAttention(cfg, name="attn")(norm("attn_norm")(x), k_buf=kv[0], v_buf=kv[1], **ctx)
    x = x + h
    x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
    return x, (k_buf, v_buf)


class CachedDecoder(nn.Module):
  """`transformer.Decoder` (same parameter tree, scanned or not) over a chunk, with a KV cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: KVCache, *, cos: jax.Array, sin: jax.Array,
               attn_end: jax.Array, segment_ids: jax.Array, k_segment: jax.Array,
               start: jax.Array | int) -> tuple[jax.Array, KVCache]:
    cfg = self.cfg
    ctx = dict(cos=cos, sin=sin, attn_end=attn_end, segment_ids=segment_ids, k_segment=k_segment, start=start)
    if cfg.scan_layers:
      stack = nn.scan(CachedDecoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, 0), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, (k, v) = stack(cfg, name="layers")(x, ctx, (cache.k, cache.v))
    else:
      ks, vs = [], []
      for i in range(cfg.num_layers):
        x, (k, v) = CachedDecoderBlock(cfg, name=f"layers_{i}")(x, ctx, (cache.k[i], cache.v[i]))
        ks.append(k)
        vs.append(v)
      k, v = jnp.stack(ks), jnp.stack(vs)
    x = RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="final_norm")(x)
    return x, KVCache(k=k, v=v)
