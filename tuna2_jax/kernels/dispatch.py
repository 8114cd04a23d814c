"""Attention backend selection: one call site, an explicit choice per platform, every fallback logged.

  model.attention = "auto" | "xla" | "chunked" | "pallas" | "cudnn" | "ring"

- "xla": dense jnp (materialises [B, H, L, L] logits; FlashAttention's backward in closed form);
  "chunked": O(L)-memory online softmax in jnp.
- "pallas": the hybrid-mask flash kernel (`flash.hybrid_attention`): Mosaic on TPU, Pallas-Triton on GPU,
  interpret mode on CPU (slow; for tests). Under a multi-device mesh it runs inside `jax.shard_map` over the
  batch and head axes, because Pallas kernels are not auto-partitioned.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`. cuDNN's mask types (causal, padding,
  sliding window) cannot express bidirectional image spans, and the packed-segment (THD) API is not exposed in
  `jax.nn`, so this path passes the contract's mask as a dense boolean [B, 1, L, L] (L^2 bytes per row: 64 MiB
  at 8K). It is therefore limited to L <= CUDNN_MAX_LEN and bf16/fp16 inputs; it exists as a baseline.
- "ring": context parallelism over the mesh's `sequence` axis (`ring.ring_attention`).
- "auto": ring if the current mesh has sequence > 1 (the other backends stay exact under a
  sequence-sharded mesh, XLA gathers the keys for them, but only ring keeps L sharded); else pallas on TPU
  and GPU; on CPU xla for rows up to AUTO_DENSE_MAX_LEN tokens and chunked above.

Each decision is logged once per distinct (request, outcome) with absl logging; a fallback is a warning that
names the reason.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from tuna2_jax.kernels import flash, ring, xla_attention

IMPLS = ("auto", "xla", "chunked", "pallas", "cudnn", "ring")
AUTO_DENSE_MAX_LEN = 1024   # CPU: dense attention up to here, chunked above (memory grows as L^2)
CUDNN_MAX_LEN = 8192        # the dense mask costs L^2 bytes per row
SEQUENCE_AXIS = "sequence"
_logged: set[tuple] = set()


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: str
  reason: str


def _log_once(requested: str, choice: Choice, fallback: bool) -> None:
  key = (requested, choice.impl, choice.reason)
  if key in _logged:
    return
  _logged.add(key)
  if fallback:
    logging.warning("attention: %r unavailable, using %r: %s", requested, choice.impl, choice.reason)
  else:
    logging.info("attention: %r -> %r (%s)", requested, choice.impl, choice.reason)


def _sequence_size(mesh) -> int:
  if mesh is None or mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[SEQUENCE_AXIS]


def select(impl: str, *, platform: str, length: int, head_dim: int, dtype, mesh=None) -> tuple[Choice, bool]:
  """(choice, is_fallback) for a requested backend on `platform` ("cpu", "gpu", "tpu")."""
  if impl not in IMPLS:
    raise ValueError(f"model.attention={impl!r} not in {IMPLS}")
  seq = _sequence_size(mesh)

  def auto(why: str) -> Choice:
    if seq > 1:
      return Choice("ring", f"{why}mesh sequence axis = {seq}")
    if platform in ("tpu", "gpu"):
      return pallas_or_fallback(f"{why}platform {platform}")
    if length <= AUTO_DENSE_MAX_LEN:
      return Choice("xla", f"{why}cpu, L={length} <= {AUTO_DENSE_MAX_LEN}")
    return Choice("chunked", f"{why}cpu, L={length} > {AUTO_DENSE_MAX_LEN}")

  def pallas_or_fallback(why: str) -> Choice:
    if platform == "gpu" and head_dim & (head_dim - 1):
      return Choice("chunked", f"{why}; the Triton kernel needs a power-of-two head_dim, got {head_dim}")
    return Choice("pallas", why)

  if impl == "auto":
    return auto(""), False
  if impl == "ring":
    if seq <= 1:
      return auto("no mesh 'sequence' axis > 1; auto: "), True
    return Choice("ring", f"mesh sequence axis = {seq}"), False
  if impl == "pallas":
    choice = pallas_or_fallback(f"platform {platform}" + (" (interpret mode)" if platform == "cpu" else ""))
    return choice, choice.impl != "pallas"
  if impl == "cudnn":
    if platform != "gpu":
      return auto(f"cudnn needs a GPU, platform is {platform}; auto: "), True
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return pallas_or_fallback(f"cudnn needs bf16/fp16 inputs, got {jnp.dtype(dtype).name}"), True
    if length > CUDNN_MAX_LEN:
      return pallas_or_fallback(f"cudnn needs a dense L x L mask here; L={length} > {CUDNN_MAX_LEN}"), True
    return Choice("cudnn", "dense boolean mask"), False
  return Choice(impl, "requested"), False


def cudnn_attention(q, k, v, segment_ids, attn_end) -> jax.Array:
  """cuDNN fused attention with the contract's mask passed densely ([B, 1, L, L] bool)."""
  l = q.shape[1]
  kidx = jnp.arange(l)
  mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
          & (kidx[None, None, :] <= attn_end[:, :, None]))[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  # Padding rows have no allowed key; the contract returns zeros there (cuDNN's value is unspecified).
  return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def _batch_head_specs(mesh, b: int, hq: int, hkv: int) -> tuple[P, P, P]:
  """Specs that shard batch over (data, fsdp) and heads over tensor where the sizes divide."""
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  if batch and b % math.prod(mesh.shape[a] for a in batch):
    batch = ()
  heads = "tensor" if ("tensor" in mesh.axis_names and mesh.shape["tensor"] > 1
                       and hq % mesh.shape["tensor"] == 0 and hkv % mesh.shape["tensor"] == 0) else None
  bspec = batch or None
  return P(bspec, None, heads, None), P(bspec, None, heads, None), P(bspec, None)


def pallas_attention(q, k, v, segment_ids, attn_end, *, block_q=None, block_k=None, mesh=None,
                     platform: str | None = None) -> jax.Array:
  """The flash kernel, wrapped in a shard_map over batch/head axes when a multi-device mesh is active.

  `platform` (default: JAX's backend) picks the kernel family and interpret mode (CPU only)."""
  platform = platform or jax.default_backend()
  call = lambda q_, k_, v_, s_, e_: flash.hybrid_attention(
      q_, k_, v_, s_, e_, block_q=block_q, block_k=block_k, interpret=platform == "cpu",
      backend=flash.default_kernel_backend(platform))
  if mesh is None or mesh.empty or mesh.size == 1:
    return call(q, k, v, segment_ids, attn_end)
  qs, kvs, vec = _batch_head_specs(mesh, q.shape[0], q.shape[2], k.shape[2])
  return jax.shard_map(call, mesh=mesh, in_specs=(qs, kvs, kvs, vec, vec), out_specs=qs,
                       check_vma=False)(q, k, v, segment_ids, attn_end)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array, attn_end: jax.Array,
              impl: str = "auto", chunk: int = 512, block_q: int | None = None,
              block_k: int | None = None, platform: str | None = None) -> jax.Array:
  """Hybrid-mask attention through the selected backend; q [B, L, Hq, D], k/v [B, L, Hkv, D]."""
  mesh = jax.sharding.get_abstract_mesh()
  # The mesh's devices decide (an abstract TPU topology on a CPU host compiles for TPU), else the backend.
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = platform or (device.platform if device is not None else jax.default_backend())
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  choice, fallback = select(impl, platform=platform, length=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype,
                            mesh=mesh)
  _log_once(impl, choice, fallback)
  if choice.impl == "xla":
    return xla_attention.dense_attention_fast(q, k, v, segment_ids, attn_end)
  if choice.impl == "chunked":
    return xla_attention.chunked_attention(q, k, v, segment_ids, attn_end, chunk=chunk)
  if choice.impl == "cudnn":
    return cudnn_attention(q, k, v, segment_ids, attn_end)
  if choice.impl == "ring":
    return ring.ring_attention(q, k, v, segment_ids, attn_end, mesh=mesh, axis=SEQUENCE_AXIS)
  return pallas_attention(q, k, v, segment_ids, attn_end, block_q=block_q, block_k=block_k, mesh=mesh,
                          platform=platform)
