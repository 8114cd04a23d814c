"""Ring attention on a 4-way `sequence` mesh of fake CPU devices: exact against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from tests.kernels.layouts import random_layout
from tuna2_jax.kernels import hybrid_attention, ring_attention
from tuna2_jax.kernels.ring import zigzag_permutation


def _inputs(seed, b, l, hq, hkv, d):
  seg, end = random_layout(np.random.default_rng(seed), b, l, min_used=0.7)
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, l, hq, d))
  k = jax.random.normal(keys[1], (b, l, hkv, d))
  v = jax.random.normal(keys[2], (b, l, hkv, d))
  do = jax.random.normal(keys[3], (b, l, hq, d))
  return q, k, v, jnp.asarray(seg), jnp.asarray(end), do


def test_zigzag_balances_causal_work():
  perm = np.asarray(zigzag_permutation(64, 4)).reshape(4, 16)
  work = (perm + 1).sum(-1)                       # causal keys per device
  assert work.max() == work.min()
  assert sorted(perm.reshape(-1).tolist()) == list(range(64))


@pytest.mark.parametrize("mesh_shape,load_balance,length", [
    ({"sequence": 4}, True, 128),
    ({"data": 2, "sequence": 4}, False, 100),     # batch sharded too; L not a multiple of 4: padded
])
def test_ring_matches_reference(mesh_shape, load_balance, length):
  q, k, v, seg, end, do = _inputs(length, 2, length, 4, 2, 16)
  mesh = jax.make_mesh(tuple(mesh_shape.values()), tuple(mesh_shape), devices=jax.devices()[:np.prod(
      list(mesh_shape.values()))], axis_types=(AxisType.Auto,) * len(mesh_shape))
  ref = lambda q, k, v: hybrid_attention(q, k, v, seg, end, impl="reference")
  out_r, vjp_r = jax.vjp(ref, q, k, v)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v: ring_attention(q, k, v, seg, end, load_balance=load_balance))
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(do)
  for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_r, *vjp_r(do)), strict=False):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=name)


def test_ring_needs_a_sequence_axis():
  q, k, v, seg, end, _ = _inputs(0, 1, 16, 2, 2, 8)
  with pytest.raises(ValueError, match="sequence"):
    ring_attention(q, k, v, seg, end, mesh=jax.make_mesh((1,), ("data",)))
