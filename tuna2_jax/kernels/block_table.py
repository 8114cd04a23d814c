"""The block table of the hybrid mask: which (q-block, k-block) tiles are empty, partial or full.

The contract's mask is `allowed(q, k) = seg[q] == seg[k] != 0 and k <= attn_end[q]`. Every kernel tiles the
L x L score matrix into [block_q x block_k] tiles and classifies each tile from O(L) per-token statistics
(per block: min/max segment id, min/max attn_end, min/max segment start) without ever forming an L x L array:

  EMPTY    no pair allowed: no compute, no DMA.
  FULL     every pair allowed: compute without applying the mask.
  PARTIAL  anything else: compute and apply the element-wise mask.

The classification is *sound for any input* (EMPTY and FULL are never claimed wrongly) and *exact* for packed
rows (contiguous segments, image spans inside their segment; pallas.md §6.1, checked against the dense mask in
tests/kernels/test_block_table.py). Two derived forms feed the kernels:

  - `ranges`: per q block the interval [lo, hi) of non-empty k blocks and [full_lo, full_hi) of full ones
    (the GPU kernel's loop bounds: masked edges, unmasked middle);
  - `compact`: per q block the list of non-empty k block indices, padded by repeating the last one (the TPU
    kernel's scalar-prefetched index table: a repeated block index issues no DMA, splash's "data_next").

The transposed table (for dK/dV) is the same table with the q and k roles swapped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2

_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """Per-token fields the tables are built from, [B, L] int32 each."""
  segment_ids: jax.Array
  attn_end: jax.Array
  seg_start: jax.Array   # a lower bound of the first index of the token's segment


def token_stats(segment_ids: jax.Array, attn_end: jax.Array) -> TokenStats:
  """seg_start[q] = first index of seg[q] in the row, via a scatter-min over segment ids (O(L)).

  A scatter (not a run-start cummax) keeps the table sound even if a segment id reappears later in the row;
  ids above L share the last slot, which only lowers the bound (still sound).
  """
  b, l = segment_ids.shape
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  slot = jnp.clip(segment_ids, 0, l)
  first = jnp.full((b, l + 1), l, jnp.int32)
  first = jax.vmap(lambda f, s, p: f.at[s].min(p))(first, slot, pos)
  seg_start = jnp.take_along_axis(first, slot, axis=1)
  return TokenStats(segment_ids.astype(jnp.int32), attn_end.astype(jnp.int32), seg_start)


def _block_reduce(x: jax.Array, valid: jax.Array, block: int, op: str) -> jax.Array:
  """min or max of x over the valid tokens of each block; [B, L] -> [B, L // block]."""
  b, l = x.shape
  fill = _BIG if op == "min" else -_BIG
  x = jnp.where(valid, x, fill).reshape(b, l // block, block)
  return x.min(-1) if op == "min" else x.max(-1)


def block_kinds(stats: TokenStats, block_q: int, block_k: int) -> jax.Array:
  """kind [B, L // block_q, L // block_k] int32 in {EMPTY, PARTIAL, FULL}. L must divide by both blocks."""
  seg, end, start = stats.segment_ids, stats.attn_end, stats.seg_start
  b, l = seg.shape
  if l % block_q or l % block_k:
    raise ValueError(f"length {l} is not a multiple of block_q={block_q} and block_k={block_k}")
  valid = seg != 0
  rq = lambda x, op: _block_reduce(x, valid, block_q, op)[:, :, None]   # [B, nq, 1]
  rk = lambda x, op: _block_reduce(x, valid, block_k, op)[:, None, :]   # [B, 1, nk]
  q_seg_min, q_seg_max = rq(seg, "min"), rq(seg, "max")
  q_end_min, q_end_max = rq(end, "min"), rq(end, "max")
  q_start_min = rq(start, "min")
  k_seg_min, k_seg_max = rk(seg, "min"), rk(seg, "max")
  k0 = (jnp.arange(l // block_k, dtype=jnp.int32) * block_k)[None, None, :]
  k1 = k0 + block_k - 1
  q_any = valid.reshape(b, -1, block_q).any(-1)[:, :, None]
  q_all = valid.reshape(b, -1, block_q).all(-1)[:, :, None]
  k_any = valid.reshape(b, -1, block_k).any(-1)[:, None, :]
  k_all = valid.reshape(b, -1, block_k).all(-1)[:, None, :]
  empty = (~q_any | ~k_any
           | (q_end_max < k0)                 # every query stops before the k block
           | (q_start_min > k1)               # every query's segment starts after it
           | (q_seg_max < k_seg_min) | (q_seg_min > k_seg_max))  # no common segment id
  one_segment = (q_seg_min == q_seg_max) & (k_seg_min == k_seg_max) & (q_seg_min == k_seg_min)
  full = q_all & k_all & one_segment & (k1 <= q_end_min)
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Ranges:
  """Per q block (or, transposed, per k block) loop bounds in block units, [B, n] int32 each."""
  lo: jax.Array
  full_lo: jax.Array
  full_hi: jax.Array
  hi: jax.Array


def ranges(kind: jax.Array) -> Ranges:
  """[lo, hi) spans every non-empty block of a row, [full_lo, full_hi) its full blocks (empty if none).

  For packed rows the full blocks of a row are contiguous (one segment, a prefix of it up to min attn_end),
  so [lo, full_lo) and [full_hi, hi) are the masked edges. Blocks inside [lo, hi) that are empty (a padding
  gap in the middle of a row) are computed masked: correct, only wasted work.
  """
  n = kind.shape[-1]
  j = jnp.arange(n, dtype=jnp.int32)
  nonempty, full = kind != EMPTY, kind == FULL
  lo = jnp.min(jnp.where(nonempty, j, n), -1)
  hi = jnp.max(jnp.where(nonempty, j + 1, 0), -1)
  lo = jnp.minimum(lo, hi)                                  # an all-empty row: lo = hi = 0
  flo = jnp.min(jnp.where(full, j, n), -1)
  fhi = jnp.max(jnp.where(full, j + 1, 0), -1)
  has_full = fhi > flo
  # Full blocks are contiguous only for packed rows; if a row breaks that, fall back to masking all of it.
  contiguous = jnp.sum(full, -1) == (fhi - flo)
  use = has_full & contiguous
  flo, fhi = jnp.where(use, flo, hi), jnp.where(use, fhi, hi)
  return Ranges(*(x.astype(jnp.int32) for x in (lo, flo, fhi, hi)))


@dataclasses.dataclass(frozen=True)
class Compact:
  """The TPU kernel's scalar-prefetch tables.

  index [B, n, n]: the t-th non-empty block of each row, then the last one repeated (no new DMA).
  kind  [B, n, n]: the kind of that block, EMPTY for the padding steps.
  steps: [1] int32, the most non-empty blocks of any row: the (shrunk) length of the grid's inner dimension.
  """
  index: jax.Array
  kind: jax.Array
  steps: jax.Array


def compact(kind: jax.Array) -> Compact:
  b, r, n = kind.shape
  j = jnp.arange(n, dtype=jnp.int32)
  nonempty = kind != EMPTY
  count = nonempty.sum(-1).astype(jnp.int32)                              # [B, r]
  order = jnp.argsort(jnp.where(nonempty, j, n + j), axis=-1, stable=True).astype(jnp.int32)
  t = j[None, None, :]
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  index = jnp.where(t < count[..., None], order, last)
  kinds = jnp.where(t < count[..., None], jnp.take_along_axis(kind, order, axis=-1), EMPTY)
  steps = jnp.maximum(count.max(), 1).reshape(1)
  return Compact(index.astype(jnp.int32), kinds.astype(jnp.int32), steps.astype(jnp.int32))


def executed_fraction(kind: jax.Array) -> dict[str, float]:
  """Fractions of empty / partial / full tiles (what a kernel skips, masks, runs unmasked)."""
  total = kind.size
  return {name: float(jnp.sum(kind == code)) / total
          for name, code in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
