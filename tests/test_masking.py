"""Masked visual feature learning: the configured fraction of patches, only when active; the token learns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tests.helpers import random_batch
from tuna2_jax import flow, losses, sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2


def _batch(seed=0, batch_size=6):
  return jax.tree.map(jnp.asarray, random_batch(seed, batch_size=batch_size, seq_len=128, patch_size=4,
                                                vocab=64, max_grid=4))


def _images(batch):
  """{(row, image id): patch positions} of every image."""
  ids, mod = np.asarray(batch["image_ids"]), np.asarray(batch["modality"])
  return {(b, i): np.flatnonzero((ids[b] == i) & (mod[b] == sequence.PATCH))
          for b in range(ids.shape[0]) for i in set(ids[b][ids[b] > 0].tolist())}


def test_mask_takes_floor_n_r_patches_of_every_image():
  batch = _batch()
  mask = np.asarray(flow.sample_patch_mask(jax.random.key(0), batch, prob=1.0, ratio_min=0.3, ratio_max=0.3))
  images = _images(batch)
  assert images
  for (b, _), pos in images.items():
    assert mask[b, pos].sum() == int(np.floor(len(pos) * 0.3))
  assert not mask[np.asarray(batch["modality"]) != sequence.PATCH].any()


def test_mask_inactive_or_off_touches_nothing():
  batch = _batch()
  for kw in (dict(prob=1.0, active=False), dict(prob=0.0, active=True)):
    mask = flow.sample_patch_mask(jax.random.key(0), batch, ratio_min=0.0, ratio_max=0.5, **kw)
    assert not np.asarray(mask).any()
  steps, last = 1000, 0.4
  assert not flow.masking_active(599, steps, last) and flow.masking_active(600, steps, last)


def test_mask_fraction_of_documents_and_ratio_distribution():
  # Many single-image rows: the share of masked documents ~ prob, the mean ratio ~ prob * E[max(r, 0)].
  docs = [[sequence.Text([7, 8]), sequence.Image(np.zeros((40, 40, 3), np.uint8), "understand")]]
  row = sequence.pack_documents(docs, seq_len=110, patch_size=4)
  batch = jax.tree.map(jnp.asarray, sequence.stack_rows([row] * 2000))
  n = 100
  for preset, share, mean_ratio in (("paper", 0.5, 0.5 * 0.25), ("release", 0.3, 0.3 * 0.15)):
    p = flow.MASKING_PRESETS[preset]
    mask = np.asarray(flow.sample_patch_mask(jax.random.key(1), batch, prob=p["mask_prob"],
                                             ratio_min=p["mask_ratio_min"], ratio_max=p["mask_ratio_max"]))
    per_row = mask.sum(1) / n
    masked = (per_row > 0).mean()
    assert abs(masked - share) < 0.04, (preset, masked)
    # floor(N r) lowers the mean ratio by at most 1/N
    assert abs(per_row.mean() - mean_ratio) < 0.02, (preset, per_row.mean())


def test_mask_token_replaces_patches_and_receives_gradient():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=32, flow_layers=1, flow_heads=2, flow_kv_heads=1, flow_head_dim=16,
                    flow_mlp_dim=32,
                    patch_size=4)
  batch = _batch(2, batch_size=2)
  model = Tuna2(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  config = ml_collections.ConfigDict(dict(train=dict(
      steps=10, text_loss_weight=1.0, flow_loss_weight=1.0, flow_p_mean=-0.8, flow_p_std=0.8, noise_scale=2.0,
      t_eps=0.05, und_noise_prob=0.0, und_noise_max=0.1, mask_last_fraction=1.0, mask_prob=1.0,
      mask_ratio_min=0.5, mask_ratio_max=0.5)))
  loss_fn = lambda p: losses.compute_loss(p, batch, jax.random.key(1), model=model, config=config,
                                         step=jnp.asarray(5))[0]
  grad = jax.jit(jax.grad(loss_fn))(params)
  assert float(jnp.abs(grad["mask_token"]).sum()) > 0
