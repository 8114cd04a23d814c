"""The objective: global-count normalisation (exact accumulation), both terms, rows without images or text."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.helpers import random_batch
from tuna2_jax import losses, sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=32, flow_layers=1, flow_heads=2, flow_kv_heads=1, flow_head_dim=16, flow_mlp_dim=32,
                  patch_size=4)
CONFIG = ml_collections.ConfigDict(dict(train=dict(
    steps=100, text_loss_weight=0.7, flow_loss_weight=1.3, flow_p_mean=-0.8, flow_p_std=0.8, noise_scale=2.0,
    t_eps=0.05, und_noise_prob=0.1, und_noise_max=0.1, mask_last_fraction=0.4, mask_prob=0.5,
    mask_ratio_min=0.0, mask_ratio_max=0.5)))


@pytest.fixture(scope="module")
def setup():
  batch = jax.tree.map(jnp.asarray, random_batch(7, batch_size=4, seq_len=96, patch_size=4, vocab=64))
  batch["image_role"] = batch["image_role"].at[0].set(  # make sure there is a generation target
      jnp.where(batch["image_ids"][0] > 0, sequence.GENERATE, 0).astype(jnp.int8))
  model = Tuna2(CFG)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  return model, params, batch


def _loss(model, config):
  return jax.jit(lambda p, b, rng, step, counts: losses.compute_loss(p, b, rng, model=model, config=config,
                                                                     step=step, counts=counts))


def test_terms_match_an_independent_computation(setup):
  model, params, batch = setup
  rng, step = jax.random.key(3), jnp.asarray(80)
  loss, metrics = _loss(model, CONFIG)(params, batch, rng, step, None)
  # The same inputs, then NumPy formulas on the model's outputs.
  inputs, mask = losses.model_inputs(batch, rng, config=CONFIG, step=step)
  out = model.apply({"params": params}, batch, pixels=inputs.pixels, t=inputs.t, patch_mask=mask)
  logits, tokens, w = map(np.asarray, (out.logits, batch["tokens"], batch["text_loss"]))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64)))
  targets = np.roll(tokens, -1, -1)
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  text = (ce * w).sum() / w.sum()
  tgt = np.asarray(inputs.loss_mask)
  t = np.asarray(inputs.t)
  err = np.mean((np.asarray(out.x_pred) - np.asarray(inputs.target)) ** 2, -1) / np.maximum(1 - t, 0.05) ** 2
  flow_val = (err * tgt).sum() / tgt.sum()
  np.testing.assert_allclose(metrics["text_loss"], text, rtol=1e-4)
  np.testing.assert_allclose(metrics["flow_loss"], flow_val, rtol=1e-4)
  np.testing.assert_allclose(loss, 0.7 * text + 1.3 * flow_val, rtol=1e-4)
  counts = losses.term_counts(batch, CONFIG)
  assert metrics["flow_count"] == counts["flow"] == tgt.sum() > 0
  assert metrics["text_count"] == counts["text"] == w.sum()


def test_accumulation_with_global_counts_is_exact(setup):
  model, params, batch = setup
  fn = jax.jit(jax.grad(lambda p, b, counts: losses.compute_loss(p, b, jax.random.key(4), model=model,
                                                                 config=CONFIG, step=jnp.asarray(0),
                                                                 counts=counts)[0]))
  counts = losses.term_counts(batch, CONFIG)
  halves = [jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 2), slice(2, 4))]
  # Two micro-batches with the global counts vs the gradient of sum(term sums) / global count.
  g_sum = jax.tree.map(lambda a, b: a + b, *[fn(params, h, counts) for h in halves])
  loss_fn = lambda p, h: losses.loss_terms(p, h, jax.random.key(4), model=model, config=CONFIG,
                                           step=jnp.asarray(0))

  def total(p):
    out = 0.0
    for h in halves:
      terms = loss_fn(p, h)
      out += 0.7 * terms["text"][0] / counts["text"] + 1.3 * terms["flow"][0] / counts["flow"]
    return out

  g_ref = jax.jit(jax.grad(total))(params)
  for a, b in zip(jax.tree.leaves(g_sum), jax.tree.leaves(g_ref), strict=False):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_rows_without_images_or_text(setup):
  model, params, _ = setup
  text_only = jax.tree.map(jnp.asarray, sequence.text_batch(np.arange(1, 17).reshape(2, 8) % 60 + 6, 4))
  _, m = _loss(model, CONFIG)(params, text_only, jax.random.key(0), jnp.asarray(0), None)
  assert m["flow_count"] == 0 and m["flow_loss"] == 0 and m["text_loss"] > 0
  img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  doc = [sequence.Image(img, "generate")]
  image_only = jax.tree.map(jnp.asarray, sequence.stack_rows([sequence.pack_documents([doc], seq_len=8,
                                                                                      patch_size=4)] * 2))
  loss, m = _loss(model, CONFIG)(params, image_only, jax.random.key(0), jnp.asarray(0), None)
  assert m["text_count"] == 0 and m["text_loss"] == 0 and m["flow_count"] == 8
  assert np.isfinite(loss) and loss > 0
