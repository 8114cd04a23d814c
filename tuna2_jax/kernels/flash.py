"""`hybrid_attention`: the public flash-attention entry for the contract's mask, with its custom VJP.

  out = hybrid_attention(q, k, v, segment_ids, attn_end)      # q [B, L, Hq, D], k/v [B, L, Hkv, D]

`impl="pallas"` runs the Pallas kernel of the current platform (TPU: Mosaic, `mosaic_tpu.py`; GPU:
Pallas-Triton, `triton_gpu.py`; CPU: the TPU kernel in interpret mode); `impl="reference"` is the dense
float32 `xla_attention.dense_attention`. Any L works: rows are padded to the block multiple with segment 0
(the mask's padding segment, which attends nothing and is attended by nothing), never left ragged (jax#27224
is the silent wrong answer otherwise), and the padding is sliced off again.

The backward pass is a `jax.custom_vjp`: a dQ kernel over the forward table and a dK/dV kernel over the
transposed table. Residuals are q, k, v (already live in the model), the output and the f32 log-sum-exp, the
last two tagged with `checkpoint_name` ("attention_out", "attention_lse") so a remat policy such as
`save_only_these_names` can keep them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tuna2_jax.kernels import block_table, mosaic_tpu, triton_gpu, xla_attention
from tuna2_jax.kernels.block_sizes import BlockSizes, default_block_sizes

IMPLS = ("pallas", "reference")


def default_kernel_backend(platform: str | None = None) -> str:
  """Which Pallas kernel family serves `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  return "triton" if platform in ("gpu", "cuda", "rocm") else "mosaic_tpu"


@dataclasses.dataclass(frozen=True)
class _Plan:
  backend: str
  sizes: BlockSizes
  interpret: Any   # False, True or a pltpu.InterpretParams


def hybrid_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, attn_end: jax.Array,
                     *, impl: str = "pallas", block_q: int | None = None, block_k: int | None = None,
                     interpret: Any = None, backend: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v under `allowed(q,k) = seg[q]==seg[k]!=0 and k <= attn_end[q]`.

  Args:
    q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] with Hq a multiple of Hkv (GQA). bf16 or f32 (f32 accumulation).
    segment_ids, attn_end: [B, L] int, the packed-sequence contract.
    impl: "pallas" (the kernel) or "reference" (dense f32).
    block_q, block_k: override the per-backend / per-generation default block sizes.
    interpret: None = interpret mode exactly when running on CPU; or True / False / `pltpu.InterpretParams`.
    backend: "mosaic_tpu" or "triton"; None picks from the platform. Cross-lowering tests set it explicitly.
  Returns:
    [B, L, Hq, D] in q's dtype; rows with no allowed key (padding) are zeros.
  """
  if impl == "reference":
    return xla_attention.dense_attention(q, k, v, segment_ids, attn_end, precision=jax.lax.Precision.HIGHEST)
  if impl != "pallas":
    raise ValueError(f"hybrid_attention: impl={impl!r} not in {IMPLS}")
  b, l, hq, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, l) or k.shape[3] != d or hq % k.shape[2]:
    raise ValueError(f"hybrid_attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
  if segment_ids.shape != (b, l) or attn_end.shape != (b, l):
    raise ValueError(f"hybrid_attention: segment_ids {segment_ids.shape} / attn_end {attn_end.shape} "
                     f"must be [B, L] = {(b, l)}")
  backend = backend or default_kernel_backend()
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  sizes = default_block_sizes(backend, l, block_q=block_q, block_k=block_k)
  plan = _Plan(backend, sizes, interpret)
  pad = -l % sizes.lcm()
  segment_ids, attn_end = segment_ids.astype(jnp.int32), attn_end.astype(jnp.int32)
  if pad:
    padw = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, padw) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))             # segment 0: masked out entirely
    attn_end = jnp.pad(attn_end, ((0, 0), (0, pad)))
  out = _flash(plan, q, k, v, segment_ids, attn_end)
  return out[:, :l] if pad else out


# ------------------------------------------------------------------------------------------------ custom VJP
def _heads_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)   # [B, L, H, D] <-> [B, H, L, D]


def _forward(plan: _Plan, q, k, v, segment_ids, attn_end):
  """-> o [B, L, Hq, D], lse [B, Hq, L] f32."""
  d = q.shape[-1]
  qs = (q * d ** -0.5).astype(q.dtype)   # fold the softmax scale into q once (pallas.md §6.2 numerics)
  stats = block_table.token_stats(segment_ids, attn_end)
  kind = block_table.block_kinds(stats, plan.sizes.block_q, plan.sizes.block_k)
  kw = dict(block_q=plan.sizes.block_q, block_k=plan.sizes.block_k, interpret=plan.interpret)
  if plan.backend == "mosaic_tpu":
    o, lse = mosaic_tpu.forward(_heads_major(qs), _heads_major(k), _heads_major(v), segment_ids, attn_end,
                                block_table.compact(kind), **kw)
    return _heads_major(o), lse
  return triton_gpu.forward(qs, k, v, segment_ids, attn_end, block_table.ranges(kind), **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, k, v, segment_ids, attn_end):
  return _forward(plan, q, k, v, segment_ids, attn_end)[0]


def _flash_fwd(plan: _Plan, q, k, v, segment_ids, attn_end):
  o, lse = _forward(plan, q, k, v, segment_ids, attn_end)
  o = checkpoint_name(o, "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return o, (q, k, v, segment_ids, attn_end, o, lse)


def _flash_bwd(plan: _Plan, res, do):
  q, k, v, segment_ids, attn_end, o, lse = res
  d = q.shape[-1]
  scale = d ** -0.5
  qs = (q * scale).astype(q.dtype)
  do = do.astype(q.dtype)
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))   # [B, Hq, L]
  bq, bk = plan.sizes.block_q_bwd, plan.sizes.block_k_bwd
  stats = block_table.token_stats(segment_ids, attn_end)
  kind = block_table.block_kinds(stats, bq, bk)
  kind_t = jnp.swapaxes(kind, 1, 2)          # rows = k blocks: the dK/dV kernel's table
  kw = dict(block_q=bq, block_k=bk, interpret=plan.interpret)
  if plan.backend == "mosaic_tpu":
    qh, kh, vh, doh = (_heads_major(x) for x in (qs, k, v, do))
    dq = mosaic_tpu.backward_dq(qh, kh, vh, doh, lse, delta, segment_ids, attn_end,
                                block_table.compact(kind), scale=scale, **kw)
    dk, dv = mosaic_tpu.backward_dkv(qh, kh, vh, doh, lse, delta, segment_ids, attn_end,
                                     block_table.compact(kind_t), **kw)
    dq, dk, dv = (_heads_major(x) for x in (dq, dk, dv))
  else:
    dq = triton_gpu.backward_dq(qs, k, v, do, lse, delta, segment_ids, attn_end, block_table.ranges(kind),
                                scale=scale, **kw)
    dk, dv = triton_gpu.backward_dkv(qs, k, v, do, lse, delta, segment_ids, attn_end,
                                     block_table.ranges(kind_t), **kw)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
