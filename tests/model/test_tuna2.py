"""The unified model: mask plumbing end to end, the sharded forward, text-only batches."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_batch
from tuna2_jax import sequence, sharding
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, patch_size=4)


def _batch(seed=0, batch_size=2, seq_len=64):
  return jax.tree.map(jnp.asarray, random_batch(seed, batch_size=batch_size, seq_len=seq_len, patch_size=4,
                                                vocab=64))


@pytest.fixture(scope="module")
def model_and_params():
  model = Tuna2(CFG)
  params = model.init(jax.random.key(0), _batch())
  hidden = jax.jit(lambda p, b, t=None: model.apply(p, b, t=t).hidden)
  return model, params, hidden


def test_a_patch_reaches_exactly_the_positions_the_mask_allows(model_and_params):
  _, params, apply = model_and_params
  batch = _batch()
  hidden = apply(params, batch)
  patch_pos = np.flatnonzero(np.asarray(batch["modality"][0]) == sequence.PATCH)
  j = int(patch_pos[0])
  poked = dict(batch, patches=batch["patches"].at[0, j].set(255 - batch["patches"][0, j]))
  poked_hidden = apply(params, poked)
  changed = np.abs(np.asarray(poked_hidden - hidden)[0]).max(-1) > 1e-6
  # Position q changes iff it can reach j through some chain of allowed attention (within 2 layers).
  mask = np.asarray(sequence.dense_mask(batch["segment_ids"], batch["attn_end"]))[0]
  reach = mask[:, j].copy()
  reach |= (mask.astype(int) @ reach.astype(int)) > 0
  reach[j] = True
  np.testing.assert_array_equal(changed, reach)
  assert (np.asarray(poked_hidden[1]) == np.asarray(hidden[1])).all()


def test_time_slot_reads_t(model_and_params):
  _, params, apply = model_and_params
  batch = _batch()
  base = apply(params, batch)
  t = jnp.where(batch["modality"] == sequence.TIME, 0.3, 1.0)
  moved = apply(params, batch, t)
  time_rows = np.asarray(batch["modality"]) == sequence.TIME
  assert time_rows.any()
  diff = np.abs(np.asarray(moved - base)).max(-1)
  assert (diff[time_rows] > 1e-6).all()
  # Positions before the first TIME slot of their row cannot see any TIME slot.
  for r in range(diff.shape[0]):
    first = np.flatnonzero(time_rows[r])
    if len(first):
      assert (diff[r, :first[0]] == 0).all()


def test_sharded_forward_equals_single_device():
  batch = _batch(seed=1, batch_size=4)
  cfg = dataclasses.replace(CFG, num_kv_heads=2)
  model = Tuna2(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch))
  want = model.apply(params, batch).logits
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  rules = sharding.RULES["fsdp_tp"]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    p_shard = sharding.logical_to_sharding(abstract, mesh, rules)
    sharded = jax.device_put(params, p_shard)
    b_shard = sharding.batch_shardings(batch, mesh)
    fn = jax.jit(lambda p, b: model.apply(p, b).logits, in_shardings=(p_shard, b_shard))
    got = fn(sharded, jax.device_put(batch, b_shard))
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_text_batch_logits_are_causal(model_and_params):
  model, params, _ = model_and_params
  logits = jax.jit(lambda p, b: model.apply(p, b).logits)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  full = logits(params, jax.tree.map(jnp.asarray, sequence.text_batch(tokens, 4)))
  prefix = jax.tree.map(jnp.asarray, sequence.text_batch(tokens[:, :7], 4))
  np.testing.assert_allclose(logits(params, prefix), full[:, :7], atol=1e-5)
