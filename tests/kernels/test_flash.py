"""The Pallas kernels in interpret mode against the dense float32 reference: values and VJPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from tests.kernels.layouts import random_layout
from tuna2_jax.kernels import hybrid_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _inputs(seed, b, l, hq, hkv, d, dtype, *, pad_row=False):
  rng = np.random.default_rng(seed)
  seg, end = random_layout(rng, b, l)
  if pad_row:                          # an all-padding row: zeros out, zero gradients
    seg[-1] = 0
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, l, hq, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, l, hkv, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, l, hkv, d), jnp.float32)
  do = jax.random.normal(keys[3], (b, l, hq, d), jnp.float32)
  return (q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(seg), jnp.asarray(end),
          do.astype(dtype))


def _check(fn, q, k, v, seg, end, do, tol):
  ref = functools.partial(hybrid_attention, impl="reference")
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, end), q, k, v)
  out_r, vjp_r = jax.vjp(lambda q, k, v: ref(q, k, v, seg, end), *(x.astype(jnp.float32) for x in (q, k, v)))
  assert out.dtype == q.dtype and out.shape == q.shape
  got = (out, *vjp(do))
  want = (out_r, *vjp_r(do.astype(jnp.float32)))
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
    a = np.asarray(a.astype(jnp.float32))
    assert np.isfinite(a).all(), name
    np.testing.assert_allclose(a, np.asarray(b), atol=tol, rtol=tol, err_msg=name)


CASES = [
    # backend, dtype, B, L, Hq, Hkv, D, block_q, block_k   (B = 2: the second row is all padding)
    ("mosaic_tpu", jnp.float32, 1, 256, 2, 1, 64, 128, 256),     # GQA, bq < bk
    ("mosaic_tpu", jnp.bfloat16, 2, 200, 2, 2, 128, 128, 128),   # L not a multiple of the block
    ("mosaic_tpu", jnp.float32, 1, 256, 2, 2, 32, 256, 128),     # bq > bk
    ("triton", jnp.float32, 2, 100, 2, 1, 32, 32, 64),           # padded, GQA, bq < bk
    ("triton", jnp.bfloat16, 1, 128, 2, 2, 64, 64, 32),          # bq > bk
]


@pytest.mark.parametrize("backend,dtype,b,l,hq,hkv,d,bq,bk", CASES)
def test_kernel_matches_reference(backend, dtype, b, l, hq, hkv, d, bq, bk):
  q, k, v, seg, end, do = _inputs(l + d, b, l, hq, hkv, d, dtype, pad_row=b > 1)
  fn = functools.partial(hybrid_attention, backend=backend, block_q=bq, block_k=bk, interpret=True)
  _check(fn, q, k, v, seg, end, do, TOL[dtype])


@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
def test_jit_grad_composition(backend):
  q, k, v, seg, end, do = _inputs(7, 1, 128, 2, 1, 32, jnp.float32)
  bq = 128 if backend == "mosaic_tpu" else 32

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, seg, end) * do)

  kernel = functools.partial(hybrid_attention, backend=backend, block_q=bq, block_k=bq)
  # Remat with the named residuals kept: the custom VJP must compose with jax.checkpoint policies.
  policy = jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse")
  got = jax.jit(jax.grad(jax.checkpoint(functools.partial(loss, kernel), policy=policy),
                         argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(functools.partial(loss, functools.partial(hybrid_attention, impl="reference")),
                  argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want, strict=False):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_tpu_interpreter_with_race_detection():
  """The TPU-semantics interpreter: DMA / semaphore model, uninitialised memory as NaN, race detection."""
  q, k, v, seg, end, do = _inputs(11, 1, 256, 1, 1, 64, jnp.float32)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  fn = functools.partial(hybrid_attention, backend="mosaic_tpu", block_q=128, block_k=128, interpret=params)
  _check(fn, q, k, v, seg, end, do, TOL[jnp.float32])


def test_reference_impl_is_dense_f32():
  q, k, v, seg, end, _ = _inputs(3, 1, 64, 2, 2, 16, jnp.bfloat16)
  out = hybrid_attention(q, k, v, seg, end, impl="reference")
  assert out.shape == q.shape
  with pytest.raises(ValueError, match="impl"):
    hybrid_attention(q, k, v, seg, end, impl="nope")
