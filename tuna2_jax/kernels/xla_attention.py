"""Hybrid-mask attention in plain jnp: the dense reference and a chunked O(L)-memory form.

Both take the contract's mask, `allowed(q, k) = seg[q] == seg[k] != 0 and k <= attn_end[q]`, as
(segment_ids, attn_end) [B, L]; q [B, L, Hq, D], k/v [B, L, Hkv, D] (GQA: Hq a multiple of Hkv).
Rows with no allowed key (padding) return zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": masked logits stay finite, so a fully masked tile never yields inf - inf.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, l, hq, d = q.shape
  return q.reshape(b, l, num_kv_heads, hq // num_kv_heads, d)


def _allowed(seg_q, end_q, seg_k, k_idx):
  """[B, Lq, Lk] mask from per-query (segment, attn_end) and per-key (segment, index)."""
  return ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
          & (k_idx[None, None, :] <= end_q[:, :, None]))


def _probs(q: jax.Array, k: jax.Array, segment_ids: jax.Array, attn_end: jax.Array,
           precision=None) -> jax.Array:
  """Softmax probabilities [B, Hkv, G, L, L] under the hybrid mask; rows with no allowed key are zero."""
  l, d = q.shape[1], q.shape[-1]
  qg = _group(q, k.shape[2]).astype(jnp.float32) * d ** -0.5
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=precision)
  mask = _allowed(segment_ids, attn_end, segment_ids, jnp.arange(l))[:, None, None]
  logits = jnp.where(mask, logits, _MASK_VALUE)
  p = jnp.exp(logits - logits.max(-1, keepdims=True)) * mask
  return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def _apply(p: jax.Array, v: jax.Array, precision=None) -> jax.Array:
  """p [B, Hkv, G, L, L] x v [B, L, Hkv, D] -> float32 [B, L, Hkv * G, D]."""
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=precision)
  return out.reshape(*out.shape[:2], -1, out.shape[-1])


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    attn_end: jax.Array, *, precision=None) -> jax.Array:
  """Materialises the [B, H, L, L] logits; the reference for every other backend (autodiff backward)."""
  p = _probs(q, k, segment_ids, attn_end, precision)
  return _apply(p, v, precision).astype(q.dtype)


@jax.custom_vjp
def dense_attention_fast(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                         attn_end: jax.Array) -> jax.Array:
  """`dense_attention` with FlashAttention's backward written out (the "xla" backend).

  Autodiff of the dense form walks back through the mask, the max, the exp and the normalisation, one
  [B, H, L, L] pass each, and keeps their intermediates; the closed form needs only p:
  dS = p * (dP - rowsum(dO * O)). On a 2-core CPU that makes fwd + bwd 2.9x faster at the demo's shape and
  1.8-2.2x at 512-4096 tokens (benchmarks/attention.py, `closed_form_speedup`).
  """
  return dense_attention(q, k, v, segment_ids, attn_end)


def _fast_fwd(q, k, v, segment_ids, attn_end):
  p = _probs(q, k, segment_ids, attn_end)
  out = _apply(p, v)
  return out.astype(q.dtype), (q, k, v, p, out)


def _fast_bwd(res, d_out):
  q, k, v, p, out = res
  hkv, d = k.shape[2], q.shape[-1]
  do = _group(d_out.astype(jnp.float32), hkv)                               # [B, L, Hkv, G, D]
  dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, do)
  dp = jnp.einsum("bqhgd,bkhd->bhgqk", do, v.astype(jnp.float32))
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", do, _group(out, hkv))              # rowsum(dP * p)
  ds = p * (dp - delta[..., None]) * d ** -0.5
  dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32)).reshape(q.shape)
  dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, _group(q.astype(jnp.float32), hkv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


dense_attention_fast.defvjp(_fast_fwd, _fast_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      attn_end: jax.Array, *, chunk: int = 512) -> jax.Array:
  """Online-softmax attention over [chunk x chunk] tiles; O(L) memory in forward and backward.

  Query blocks run under `lax.map` with `jax.checkpoint`, key blocks under `lax.scan`, so the backward
  pass recomputes one query block at a time instead of storing L x L probabilities. Tiles the mask leaves
  empty for the whole batch are skipped with `lax.cond` (about half of them in causal text).
  """
  b, l, hq, d = q.shape
  hkv = k.shape[2]
  c = min(chunk, l)
  pad = -l % c
  if pad:
    # Padding keys/queries get segment 0: never attended, never attending.
    padw = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, padw) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    attn_end = jnp.pad(attn_end, ((0, 0), (0, pad)))
  n = (l + pad) // c
  blocks = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)  # [n, B, c, ...]
  qb = blocks(_group(q, hkv).astype(jnp.float32) * d ** -0.5)
  kb, vb = blocks(k), blocks(v)
  seg_b, end_b = blocks(segment_ids), blocks(attn_end)
  idx_b = jnp.arange(n * c).reshape(n, c)

  def one_query_block(args):
    q_blk, seg_q, end_q = args                                       # [B, c, Hkv, G, D], [B, c]
    g = q_blk.shape[3]
    init = (jnp.full((b, hkv, g, c), _MASK_VALUE, jnp.float32),     # running max
            jnp.zeros((b, hkv, g, c), jnp.float32),                  # running denominator
            jnp.zeros((b, hkv, g, c, d), jnp.float32))               # running numerator

    def step(carry, kv):
      k_blk, v_blk, seg_k, k_idx = kv
      mask = _allowed(seg_q, end_q, seg_k, k_idx)[:, None, None]    # [B, 1, 1, cq, ck]

      def update(carry):
        m, s, acc = carry
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk.astype(jnp.float32))
        logits = jnp.where(mask, logits, _MASK_VALUE)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None]) * mask
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, v_blk.astype(jnp.float32))
        return m_new, s * corr + p.sum(-1), acc

      return jax.lax.cond(mask.any(), update, lambda c_: c_, carry), None

    (_, s, acc), _ = jax.lax.scan(step, init, (kb, vb, seg_b, idx_b))
    out = acc / jnp.maximum(s, 1e-30)[..., None]                     # [B, Hkv, G, c, D]
    return jnp.moveaxis(out, 3, 1).reshape(b, c, hq, d)

  out = jax.lax.map(jax.checkpoint(one_query_block), (qb, seg_b, end_b))  # [n, B, c, Hq, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, hq, d)[:, :l]
  return out.astype(q.dtype)
