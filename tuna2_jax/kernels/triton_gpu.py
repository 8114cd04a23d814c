"""GPU (Pallas-Triton) flash attention for the hybrid mask: forward, dQ and dK/dV `pallas_call`s.

Layout: the model's own [B, L, H, D] (Triton BlockSpecs are pointer windows, so a squeezed head dim is free),
L a multiple of both blocks, block sizes and D powers of two (a Triton rule).

The Triton backend has no scalar prefetch (pallas.md §1.3), so the block table enters as per-row loop bounds
(`block_table.ranges`, [B, n] int32 inputs read as 0-d blocks): each q block runs three `fori_loop`s over its
k blocks, masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi). Empty blocks outside
[lo, hi) are never loaded. The dK/dV kernel does the same over q blocks with the transposed table, and loops
over the q heads of its GQA group so dK/dV accumulate in registers without a reduction afterwards.

On jax 0.11.2 every CUDA `pallas_call` lowers through Triton (pallas.md §1.3) and that backend is deprecated.
A Mosaic GPU (`plgpu.kernel`, Hopper warpgroup) version is not provided: it needs a producer/consumer
TMA + WGMMA pipeline whose correctness (barriers, SMEM budget, masked edges in WGMMA row layout) can only be
established on an sm90 device, and none was available to this project when the kernel was written; the
reference FA3 kernel (`attention_mgpu.py`) also has no masks and no causal backward to build on. The Triton
kernel runs on Hopper too; tokamax's Mosaic GPU kernel with `Mask(k_start=seg_start, k_end=attn_end + 1)` is
the intended upgrade path (pallas.md §2.3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tuna2_jax.kernels.block_table import Ranges

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  # f32 operands: IEEE instead of Triton's TF32 default, so f32 runs match the f32 reference.
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _params(d: int) -> plt.CompilerParams:
  return plt.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _three_loops(r_lo, r_flo, r_fhi, r_hi, body, carry):
  """masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi)."""
  lo, flo, fhi, hi = r_lo[...], r_flo[...], r_fhi[...], r_hi[...]
  carry = jax.lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
  carry = jax.lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
  return jax.lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


# ------------------------------------------------------------------------------------------------ forward
def _fwd_kernel(r_lo, r_flo, r_fhi, r_hi, q_ref, k_ref, v_ref, qseg_ref, qend_ref, kseg_ref, o_ref, lse_ref,
                *, block_k: int):
  q = q_ref[...]
  qseg, qend = qseg_ref[...], qend_ref[...]
  bq, d = q.shape

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.ds(j * block_k, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = _dot(q, k.T)
    if masked:
      kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
      allowed = ((qseg[:, None] == kseg_ref[ks][None, :]) & (qseg[:, None] != 0)
                 & (kpos[None, :] <= qend[:, None]))
      s = jnp.where(allowed, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[:, None])
    if masked:
      p = jnp.where(allowed, p, 0.0)
    alpha = jnp.exp(m - m_new)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + p.sum(-1)

  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  acc, m, l = _three_loops(r_lo, r_flo, r_fhi, r_hi, body, carry)
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc * jnp.where(seen, 1.0 / safe_l, 0.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _scalar_spec():
  return pl.BlockSpec((None, None), lambda i, b, h: (b, i))


def forward(q, k, v, segment_ids, attn_end, rng: Ranges, *, block_q: int, block_k: int,
            interpret) -> tuple[jax.Array, jax.Array]:
  """q pre-scaled [B, L, Hq, D] -> (o [B, L, Hq, D], lse [B, Hq, L] f32)."""
  b, l, hq, d = q.shape
  group = hq // k.shape[2]
  row = lambda i, b_, h: (b_, i, h, 0)
  kv_all = lambda i, b_, h: (b_, 0, h // group, 0)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, block_k=block_k),
      grid=(l // block_q, b, hq),
      in_specs=[_scalar_spec()] * 4 + [
          pl.BlockSpec((None, block_q, None, d), row),
          pl.BlockSpec((None, l, None, d), kv_all),
          pl.BlockSpec((None, l, None, d), kv_all),
          pl.BlockSpec((None, block_q), lambda i, b_, h: (b_, i)),
          pl.BlockSpec((None, block_q), lambda i, b_, h: (b_, i)),
          pl.BlockSpec((None, l), lambda i, b_, h: (b_, 0))],
      out_specs=[pl.BlockSpec((None, block_q, None, d), row),
                 pl.BlockSpec((None, None, block_q), lambda i, b_, h: (b_, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, l), jnp.float32)],
      compiler_params=_params(d),
      interpret=interpret,
      name="hybrid_flash_fwd",
  )(rng.lo, rng.full_lo, rng.full_hi, rng.hi, q, k, v, segment_ids, attn_end, segment_ids)
  return o, lse


# ------------------------------------------------------------------------------------------------ dQ
def _dq_kernel(r_lo, r_flo, r_fhi, r_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qend_ref,
               kseg_ref, dq_ref, *, block_k: int, scale: float):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qseg, qend = qseg_ref[...], qend_ref[...]

  def body(j, dq, masked):
    ks = pl.ds(j * block_k, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    p = jnp.exp(_dot(q, k.T) - lse[:, None])
    if masked:
      kpos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
      allowed = ((qseg[:, None] == kseg_ref[ks][None, :]) & (qseg[:, None] != 0)
                 & (kpos[None, :] <= qend[:, None]))
      p = jnp.where(allowed, p, 0.0)
    ds = p * (_dot(do, v.T) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _three_loops(r_lo, r_flo, r_fhi, r_hi, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse, delta, segment_ids, attn_end, rng: Ranges, *, block_q: int, block_k: int,
                scale: float, interpret) -> jax.Array:
  b, l, hq, d = q.shape
  group = hq // k.shape[2]
  row = lambda i, b_, h: (b_, i, h, 0)
  kv_all = lambda i, b_, h: (b_, 0, h // group, 0)
  vec = lambda i, b_, h: (b_, h, i)
  return pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, scale=scale),
      grid=(l // block_q, b, hq),
      in_specs=[_scalar_spec()] * 4 + [
          pl.BlockSpec((None, block_q, None, d), row),
          pl.BlockSpec((None, l, None, d), kv_all),
          pl.BlockSpec((None, l, None, d), kv_all),
          pl.BlockSpec((None, block_q, None, d), row),
          pl.BlockSpec((None, None, block_q), vec),
          pl.BlockSpec((None, None, block_q), vec),
          pl.BlockSpec((None, block_q), lambda i, b_, h: (b_, i)),
          pl.BlockSpec((None, block_q), lambda i, b_, h: (b_, i)),
          pl.BlockSpec((None, l), lambda i, b_, h: (b_, 0))],
      out_specs=pl.BlockSpec((None, block_q, None, d), row),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(d),
      interpret=interpret,
      name="hybrid_flash_dq",
  )(rng.lo, rng.full_lo, rng.full_hi, rng.hi, q, k, v, do, lse, delta, segment_ids, attn_end, segment_ids)


# ------------------------------------------------------------------------------------------------ dK, dV
def _dkv_kernel(r_lo, r_flo, r_fhi, r_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, qend_ref,
                kseg_ref, dk_ref, dv_ref, *, block_q: int, group: int):
  j = pl.program_id(0)
  h = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  bk = k.shape[0]
  kseg = kseg_ref[...]
  kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)

  def one_head(g, carry):
    head = h * group + g

    def body(i, carry, masked):
      dk, dv = carry
      qs = pl.ds(i * block_q, block_q)
      q, do = q_ref[qs, head, :], do_ref[qs, head, :]
      lse, delta = lse_ref[head, qs], delta_ref[head, qs]
      p = jnp.exp(_dot(q, k.T) - lse[:, None])                                  # [bq, bk]
      if masked:
        qseg, qend = qseg_ref[qs], qend_ref[qs]
        allowed = ((qseg[:, None] == kseg[None, :]) & (qseg[:, None] != 0)
                   & (kpos[None, :] <= qend[:, None]))
        p = jnp.where(allowed, p, 0.0)
      dv = dv + _dot(p.astype(do.dtype).T, do)
      ds = p * (_dot(do, v.T) - delta[:, None])
      return dk + _dot(ds.astype(q.dtype).T, q), dv

    return _three_loops(r_lo, r_flo, r_fhi, r_hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, one_head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(q, k, v, do, lse, delta, segment_ids, attn_end, rng_t: Ranges, *, block_q: int,
                 block_k: int, interpret) -> tuple[jax.Array, jax.Array]:
  """dK, dV [B, L, Hkv, D]; the grid runs over k blocks, the kernel over the q heads of each group."""
  b, l, hq, d = q.shape
  hkv = k.shape[2]
  row = lambda j, b_, h: (b_, j, h, 0)
  q_all = lambda j, b_, h: (b_, 0, 0, 0)
  out_spec = pl.BlockSpec((None, block_k, None, d), row)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block_q, group=hq // hkv),
      grid=(l // block_k, b, hkv),
      in_specs=[_scalar_spec()] * 4 + [
          pl.BlockSpec((None, l, hq, d), q_all),
          pl.BlockSpec((None, block_k, None, d), row),
          pl.BlockSpec((None, block_k, None, d), row),
          pl.BlockSpec((None, l, hq, d), q_all),
          pl.BlockSpec((None, hq, l), lambda j, b_, h: (b_, 0, 0)),
          pl.BlockSpec((None, hq, l), lambda j, b_, h: (b_, 0, 0)),
          pl.BlockSpec((None, l), lambda j, b_, h: (b_, 0)),
          pl.BlockSpec((None, l), lambda j, b_, h: (b_, 0)),
          pl.BlockSpec((None, block_k), lambda j, b_, h: (b_, j))],
      out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(d),
      interpret=interpret,
      name="hybrid_flash_dkv",
  )(rng_t.lo, rng_t.full_lo, rng_t.full_hi, rng_t.hi, q, k, v, do, lse, delta, segment_ids, attn_end,
    segment_ids)
