"""TPU (Mosaic) flash attention for the hybrid mask: forward, dQ and dK/dV `pallas_call`s.

Layout inside this module: q [B, Hq, L, D], k/v [B, Hkv, L, D] (head-major, as splash; a [B, L, H, D] block
with a squeezed H would break Mosaic's (8, 128) rule on the last two block dims), L a multiple of both blocks.

Block skipping (pallas.md §6.2, TPU row): the compacted block table (`block_table.compact`) is
scalar-prefetched into SMEM. The grid's inner dimension walks only the non-empty k blocks of each q block
(`steps`, a traced grid bound: the "shrunk grid" for long packed rows), the K/V index maps read the compacted
index, and padding steps repeat the previous index, so Mosaic's pipeline issues no DMA for them (splash's
data_next trick) and `pl.when(kind != EMPTY)` skips their compute. FULL tiles skip the mask.

Mask metadata follows splash's TPU-friendly layouts (pallas.md §2.1): per-query vectors broadcast over 128
lanes `(bq, 128)` when queries are rows, over 8 sublanes `(8, bq)` when queries are columns (the dK/dV kernel
works on the transposed tile k @ q^T, as splash's dkv kernel does). Running max / sum scratch is `(bq, 128)`
f32. Block sizes must be multiples of 128 (or the whole padded row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tuna2_jax.kernels.block_table import FULL, PARTIAL, Compact

LANES, SUBLANES = 128, 8
# Finite "minus infinity" (splash / JAX mha use the same): a fully masked tile never computes inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_NN = (((1,), (0,)), ((), ()))   # a @ b


def dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """f32-accumulated matmul; f32 operands get full precision (Mosaic's default may take bf16 passes)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def widen(x: jax.Array, n: int) -> jax.Array:
  """(r, 128) lane-replicated -> (r, n), as splash does with jnp.tile (pltpu.repeat is gone in 0.11)."""
  if n == x.shape[-1]:
    return x
  if n < x.shape[-1]:
    return x[:, :n]
  return jnp.tile(x, (1, pl.cdiv(n, x.shape[-1])))[:, :n]


def lanes(x: jax.Array) -> jax.Array:
  """[B, ..., L] -> [B, ..., L, 128]: per-query data for blocks where queries are rows."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def sublanes(x: jax.Array) -> jax.Array:
  """[B, ..., L] -> [B, ..., 8, L]: per-token data for blocks where tokens are columns."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _compiler_params(num_dims: int) -> pltpu.CompilerParams:
  # The innermost grid dimension carries the accumulator, so it must run in order ("arbitrary").
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * (num_dims - 1) + ("arbitrary",))


# ------------------------------------------------------------------------------------------------ forward
def _fwd_kernel(index_ref, kind_ref, steps_ref, q_ref, k_ref, v_ref, qseg_ref, qend_ref, kseg_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, block_k: int):
  del steps_ref
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  kind = kind_ref[b, i, t]

  def update(masked: bool):
    s = dot(q_ref[...], k_ref[...], _NT)  # [bq, bk]
    if masked:
      k0 = index_ref[b, i, t] * block_k
      kpos = k0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
      qseg, qend = widen(qseg_ref[...], block_k), widen(qend_ref[...], block_k)
      allowed = (qseg == kseg_ref[:1, :]) & (qseg != 0) & (kpos <= qend)
      s = jnp.where(allowed, s, MASK_VALUE)
    m_prev = m_sc[...]                                                       # [bq, 128]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.exp(s - widen(m_next, block_k))
    if masked:
      # A row with no allowed key yet would otherwise pick up exp(0) = 1 per masked key.
      p = jnp.where(allowed, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
    pv = dot(p.astype(v_ref.dtype), v_ref[...], _NN)
    acc_sc[...] = widen(alpha, acc_sc.shape[-1]) * acc_sc[...] + pv
    m_sc[...] = m_next

  pl.when(kind == FULL)(functools.partial(update, False))
  pl.when(kind == PARTIAL)(functools.partial(update, True))

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    # Every output block is written, also for rows that saw no key (padding): they return zeros.
    l = l_sc[...]
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_sc[...] * widen(inv, acc_sc.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, attn_end: jax.Array,
            table: Compact, *, block_q: int, block_k: int, interpret) -> tuple[jax.Array, jax.Array]:
  """q pre-scaled [B, Hq, L, D] -> (o [B, Hq, L, D], lse [B, Hq, L] f32)."""
  b, hq, l, d = q.shape
  group = hq // k.shape[1]
  nq = l // block_q
  grid = (b, hq, nq, table.steps[0])
  q_map = lambda b_, h, i, t, idx, kd, st: (b_, h, i, 0)
  kv_map = lambda b_, h, i, t, idx, kd, st: (b_, h // group, idx[b_, i, t], 0)
  qmeta_map = lambda b_, h, i, t, idx, kd, st: (b_, i, 0)
  kmeta_map = lambda b_, h, i, t, idx, kd, st: (b_, 0, idx[b_, i, t])
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, block_q, LANES), qmeta_map),
      pl.BlockSpec((None, block_q, LANES), qmeta_map),
      pl.BlockSpec((None, SUBLANES, block_k), kmeta_map),
  ]
  out_specs = [pl.BlockSpec((None, None, block_q, d), q_map),
               pl.BlockSpec((None, None, block_q, LANES), q_map)]
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, block_k=block_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, l, LANES), jnp.float32)],
      compiler_params=_compiler_params(4),
      interpret=interpret,
      name="hybrid_flash_fwd",
  )(table.index, table.kind, table.steps, q, k, v, lanes(segment_ids), lanes(attn_end),
    sublanes(segment_ids))
  return o, lse[..., 0]


# ------------------------------------------------------------------------------------------------ dQ
def _dq_kernel(index_ref, kind_ref, steps_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qseg_ref, qend_ref, kseg_ref, dq_ref, acc_sc, *, block_k: int, scale: float):
  del steps_ref
  b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)

  kind = kind_ref[b, i, t]

  def update(masked: bool):
    k = k_ref[...]
    s = dot(q_ref[...], k, _NT)                                             # [bq, bk]
    p = jnp.exp(s - widen(lse_ref[...], block_k))
    if masked:
      kpos = index_ref[b, i, t] * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
      qseg, qend = widen(qseg_ref[...], block_k), widen(qend_ref[...], block_k)
      p = jnp.where((qseg == kseg_ref[:1, :]) & (qseg != 0) & (kpos <= qend), p, 0.0)
    dp = dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - widen(delta_ref[...], block_k))
    acc_sc[...] += dot(ds.astype(k.dtype), k, _NN)

  pl.when(kind == FULL)(functools.partial(update, False))
  pl.when(kind == PARTIAL)(functools.partial(update, True))

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, segment_ids, attn_end, table: Compact, *, block_q: int,
                block_k: int, scale: float, interpret) -> jax.Array:
  """dQ [B, Hq, L, D] from the forward-ordered table; q is the pre-scaled query."""
  b, hq, l, d = q.shape
  group = hq // k.shape[1]
  grid = (b, hq, l // block_q, table.steps[0])
  q_map = lambda b_, h, i, t, idx, kd, st: (b_, h, i, 0)
  kv_map = lambda b_, h, i, t, idx, kd, st: (b_, h // group, idx[b_, i, t], 0)
  qmeta_map = lambda b_, h, i, t, idx, kd, st: (b_, i, 0)
  kmeta_map = lambda b_, h, i, t, idx, kd, st: (b_, 0, idx[b_, i, t])
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_q, LANES), q_map),
      pl.BlockSpec((None, None, block_q, LANES), q_map),
      pl.BlockSpec((None, block_q, LANES), qmeta_map),
      pl.BlockSpec((None, block_q, LANES), qmeta_map),
      pl.BlockSpec((None, SUBLANES, block_k), kmeta_map),
  ]
  return pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(4),
      interpret=interpret,
      name="hybrid_flash_dq",
  )(table.index, table.kind, table.steps, q, k, v, do, lanes(lse), lanes(delta), lanes(segment_ids),
    lanes(attn_end), sublanes(segment_ids))


# ------------------------------------------------------------------------------------------------ dK, dV
def _dkv_kernel(index_ref, kind_ref, steps_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qseg_ref, qend_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, block_q: int, block_k: int):
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  u = t % steps_ref[0]   # the grid's inner dim walks (q head of the group, non-empty q block)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  kind = kind_ref[b, j, u]

  def update(masked: bool):
    # The transposed tile s^T = k q^T [bk, bq]: per-query data are rows (8, bq), as in splash's dkv kernel.
    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    st = dot(k, q, _NT)                # [bk, bq]
    p = jnp.exp(st - lse_ref[:1, :])
    if masked:
      kpos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, st.shape, 0)
      kseg = widen(kseg_ref[...], block_q)
      qseg, qend = qseg_ref[:1, :], qend_ref[:1, :]
      p = jnp.where((kseg == qseg) & (qseg != 0) & (kpos <= qend), p, 0.0)
    dv_sc[...] += dot(p.astype(do.dtype), do, _NN)
    dpt = dot(v_ref[...], do, _NT)     # [bk, bq]
    ds = p * (dpt - delta_ref[:1, :])
    dk_sc[...] += dot(ds.astype(q.dtype), q, _NN)

  pl.when(kind == FULL)(functools.partial(update, False))
  pl.when(kind == PARTIAL)(functools.partial(update, True))

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, segment_ids, attn_end, table_t: Compact, *, block_q: int,
                 block_k: int, interpret) -> tuple[jax.Array, jax.Array]:
  """dK, dV [B, Hkv, L, D] from the transposed table; GQA heads of a group accumulate in one scratch."""
  b, hq, l, d = q.shape
  hkv = k.shape[1]
  group = hq // hkv
  grid = (b, hkv, l // block_k, group * table_t.steps[0])
  q_map = lambda b_, h, j, t, idx, kd, st: (b_, h * group + t // st[0], idx[b_, j, t % st[0]], 0)
  row_map = lambda b_, h, j, t, idx, kd, st: (b_, h * group + t // st[0], 0, idx[b_, j, t % st[0]])
  kv_map = lambda b_, h, j, t, idx, kd, st: (b_, h, j, 0)
  qmeta_map = lambda b_, h, j, t, idx, kd, st: (b_, 0, idx[b_, j, t % st[0]])
  kmeta_map = lambda b_, h, j, t, idx, kd, st: (b_, j, 0)
  in_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, SUBLANES, block_q), row_map),
      pl.BlockSpec((None, None, SUBLANES, block_q), row_map),
      pl.BlockSpec((None, SUBLANES, block_q), qmeta_map),
      pl.BlockSpec((None, SUBLANES, block_q), qmeta_map),
      pl.BlockSpec((None, block_k, LANES), kmeta_map),
  ]
  out_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, block_k=block_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=[out_spec, out_spec],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(4),
      interpret=interpret,
      name="hybrid_flash_dkv",
  )(table_t.index, table_t.kind, table_t.steps, q, k, v, do, sublanes(lse), sublanes(delta),
    sublanes(segment_ids), sublanes(attn_end), lanes(segment_ids))
