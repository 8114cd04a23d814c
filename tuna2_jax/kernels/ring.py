"""Context-parallel ring attention over the mesh's `sequence` axis, for the contract's hybrid mask.

Each of the n devices on the axis holds L / n queries and the matching keys/values. For n steps every device
attends its queries to the K/V chunk it currently holds (online softmax: running max, denominator and
numerator in f32), then passes the chunk, with its segment ids and original token indices, to the next device
with `ppermute`. The mask needs nothing else: `allowed(q, k) = seg[q] == seg[k] != 0 and idx[k] <=
attn_end[q]` holds for any token order as long as each key carries its original index.

Load balancing (causal rows): with contiguous chunks device 0 would see one chunk of work and device n-1 all
n. The row is cut into 2n chunks and device r holds chunks r and 2n-1-r (the "zigzag" layout), so every device
gets the same amount of causal work. The permutation is applied to the global arrays inside `ring_attention`
(XLA turns it into collectives); a data pipeline that already emits zigzag-ordered rows could skip it.

Block skipping: every (q chunk, k chunk) pair is classified from min/max statistics (as `block_table`) and
empty pairs are skipped with `lax.cond`; the backward pass is JAX's transpose of the loop (`ppermute` reverses
direction), with each step rematerialised so no [chunk x chunk] probabilities are stored across steps.
The per-step tile is plain XLA (einsum); using the Pallas kernel per step is the next optimisation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tuna2_jax.kernels import block_table

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def zigzag_permutation(length: int, n: int) -> jax.Array:
  """Token order such that device r of n (holding the r-th contiguous L/n slice) gets chunks r and 2n-1-r."""
  c = length // (2 * n)
  chunks = jnp.arange(length, dtype=jnp.int32).reshape(2 * n, c)
  order = [i for r in range(n) for i in (r, 2 * n - 1 - r)]
  return chunks[jnp.array(order)].reshape(-1)


_BIG = jnp.iinfo(jnp.int32).max


def _key_stats(seg, idx):
  """Per-chunk key statistics for the empty test; seg/idx [B, c]."""
  valid = seg != 0
  return dict(any=valid.any(), seg_min=jnp.where(valid, seg, _BIG).min(),
              seg_max=jnp.where(valid, seg, -1).max(), idx_min=jnp.where(valid, idx, _BIG).min(),
              idx_max=jnp.where(valid, idx, -1).max())


def _query_stats(seg, end, start, idx):
  """Per-chunk query statistics: the key ones plus the largest attn_end and smallest segment start."""
  valid = seg != 0
  return dict(_key_stats(seg, idx), end_max=jnp.where(valid, end, -1).max(),
              start_min=jnp.where(valid, start, _BIG).min())


def _maybe_nonempty(q, k):
  """False only if no (query, key) pair of the two chunks can be allowed (sound, batch-wide)."""
  return (q["any"] & k["any"] & (q["end_max"] >= k["idx_min"]) & (q["start_min"] <= k["idx_max"])
          & (q["seg_max"] >= k["seg_min"]) & (q["seg_min"] <= k["seg_max"]))


def _tile_update(carry, q, k, v, seg_q, end_q, seg_k, idx_k):
  """One online-softmax step; q [B, cq, Hkv, G, D] pre-scaled f32, k/v [B, ck, Hkv, D]."""
  m, l, acc = carry                                                     # [B, Hkv, G, cq], .., [.., D]
  allowed = ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
             & (idx_k[:, None, :] <= end_q[:, :, None]))[:, None, None]   # [B, 1, 1, cq, ck]
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(jnp.float32))
  s = jnp.where(allowed, s, _MASK_VALUE)
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, v.astype(jnp.float32))
  return m_new, l * corr + p.sum(-1), acc


def _ring_body(q, k, v, seg, end, start, idx, *, axis: str, n: int, halves: int):
  """Per-device body: q [B, Lc, Hq, D], k/v [B, Lc, Hkv, D], seg/end/start/idx [B, Lc]."""
  b, lc, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  c = lc // halves
  split = lambda x: [x[:, i * c:(i + 1) * c] for i in range(halves)]
  qs = split((q.astype(jnp.float32) * d ** -0.5).reshape(b, lc, hkv, g, d))
  seg_q, end_q, start_q, idx_q = split(seg), split(end), split(start), split(idx)
  q_stats = [_query_stats(seg_q[i], end_q[i], start_q[i], idx_q[i]) for i in range(halves)]
  carry = [(jnp.full((b, hkv, g, c), _MASK_VALUE, jnp.float32), jnp.zeros((b, hkv, g, c), jnp.float32),
            jnp.zeros((b, hkv, g, c, d), jnp.float32)) for _ in range(halves)]
  update = jax.checkpoint(_tile_update)   # recompute each tile's probabilities in the backward pass
  shift = [(i, (i + 1) % n) for i in range(n)]
  kv = (k, v, seg, idx)
  for step in range(n):
    k_cur, v_cur, seg_cur, idx_cur = kv
    k_parts, v_parts, seg_parts, idx_parts = split(k_cur), split(v_cur), split(seg_cur), split(idx_cur)
    for qi in range(halves):
      for ki in range(halves):
        k_stats = _key_stats(seg_parts[ki], idx_parts[ki])
        run = _maybe_nonempty(q_stats[qi], k_stats)
        args = (qs[qi], k_parts[ki], v_parts[ki], seg_q[qi], end_q[qi], seg_parts[ki], idx_parts[ki])
        carry[qi] = jax.lax.cond(run, update, lambda cr, *_: cr, carry[qi], *args)
    if step < n - 1:
      kv = tuple(jax.lax.ppermute(x, axis, shift) for x in kv)
  outs = []
  for m, l, acc in carry:
    del m
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)         # padding rows -> zeros
    outs.append(jnp.moveaxis(acc * inv[..., None], 3, 1).reshape(b, c, hq, d))
  return jnp.concatenate(outs, axis=1).astype(q.dtype)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, attn_end: jax.Array,
                   *, mesh=None, axis: str = "sequence", load_balance: bool = True) -> jax.Array:
  """Exact hybrid-mask attention with L sharded over `axis` of `mesh` (default: the current abstract mesh).

  q [B, L, Hq, D], k/v [B, L, Hkv, D], segment_ids/attn_end [B, L] (global arrays); returns [B, L, Hq, D].
  Only `axis` is manual inside the shard_map; batch and head sharding over the other mesh axes stay automatic.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or axis not in mesh.axis_names:
    raise ValueError(f"ring_attention needs a mesh with a {axis!r} axis, got {mesh}")
  n = mesh.shape[axis]
  b, l, hq, d = q.shape
  halves = 2 if load_balance else 1
  pad = -l % (n * halves)
  segment_ids, attn_end = segment_ids.astype(jnp.int32), attn_end.astype(jnp.int32)
  start = block_table.token_stats(segment_ids, attn_end).seg_start
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  if pad:
    padw = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, padw) for x in (q, k, v))
    segment_ids, attn_end, start = (jnp.pad(x, ((0, 0), (0, pad))) for x in (segment_ids, attn_end, start))
    idx = jnp.broadcast_to(jnp.arange(l + pad, dtype=jnp.int32), (b, l + pad))
  lp = l + pad
  if load_balance:
    perm = zigzag_permutation(lp, n)
    q, k, v, segment_ids, attn_end, start, idx = (
        jnp.take(x, perm, axis=1) for x in (q, k, v, segment_ids, attn_end, start, idx))
  tok, vec = P(None, axis, None, None), P(None, axis)
  body = functools.partial(_ring_body, axis=axis, n=n, halves=halves)
  out = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, vec, vec, vec, vec), out_specs=tok,
                      axis_names={axis}, check_vma=False)(q, k, v, segment_ids, attn_end, start, idx)
  if load_balance:
    out = jnp.take(out, jnp.argsort(perm), axis=1)
  return out[:, :l] if pad else out
