"""Dense and chunked hybrid-mask attention against a NumPy softmax over the contract's mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_batch
from tuna2_jax import sequence
from tuna2_jax.kernels import xla_attention


def numpy_attention(q, k, v, mask):
  """Per-head softmax(q k^T / sqrt(d)) v in float64; rows without keys are zero."""
  b, l, hq, d = q.shape
  g = hq // k.shape[2]
  out = np.zeros((b, l, hq, d))
  for bi in range(b):
    for h in range(hq):
      s = q[bi, :, h] @ k[bi, :, h // g].T / np.sqrt(d)
      s = np.where(mask[bi], s, -np.inf)
      with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
      out[bi, :, h] = p @ v[bi, :, h // g]
  return out


def inputs(seed, *, length=96, hq=4, hkv=2, d=8):
  batch = random_batch(seed, batch_size=2, seq_len=length, patch_size=4, vocab=50)
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (2, length, hq, d))
  k = jax.random.normal(keys[1], (2, length, hkv, d))
  v = jax.random.normal(keys[2], (2, length, hkv, d))
  return q, k, v, jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["attn_end"])


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_matches_numpy(seed):
  q, k, v, seg, end = inputs(seed)
  mask = np.asarray(sequence.dense_mask(seg, end))
  want = numpy_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), mask)
  got = xla_attention.dense_attention(q, k, v, seg, end, precision="highest")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("chunk", [24, 40, 128])
def test_chunked_matches_dense_values_and_grads(chunk):
  q, k, v, seg, end = inputs(2)
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, end), q, k, v)
    return out, vjp(cot)

  dense_out, dense_grads = run(lambda *a: xla_attention.dense_attention(*a, precision="highest"))
  chunk_out, chunk_grads = run(lambda *a: xla_attention.chunked_attention(*a, chunk=chunk))
  np.testing.assert_allclose(chunk_out, dense_out, atol=2e-5)
  for g_chunk, g_dense in zip(chunk_grads, dense_grads):
    np.testing.assert_allclose(g_chunk, g_dense, atol=5e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_fast_dense_matches_autodiff_of_the_reference(seed):
  """The closed-form backward equals autodiff through the dense reference, padding rows included."""
  q, k, v, seg, end = inputs(seed)
  assert np.any(np.asarray(seg) == 0)          # rows without keys take part
  cot = jax.random.normal(jax.random.key(seed + 7), q.shape)

  def run(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, end), q, k, v)
    return out, vjp(cot)

  ref_out, ref_grads = run(lambda *a: xla_attention.dense_attention(*a, precision="highest"))
  fast_out, fast_grads = jax.jit(lambda q, k, v: run(xla_attention.dense_attention_fast))(q, k, v)
  np.testing.assert_allclose(fast_out, ref_out, atol=1e-5)
  for name, g_fast, g_ref in zip("qkv", fast_grads, ref_grads, strict=True):
    np.testing.assert_allclose(g_fast, g_ref, atol=5e-5, err_msg=f"d{name}")
