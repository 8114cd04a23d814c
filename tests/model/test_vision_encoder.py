"""Tuna-R's vision encoder: position-table resize against torch's numbers, per-image attention on packed rows,
chunked (cached-inference) calls, the unified model's Tuna-R branch, and the So400M preset's size."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna2_jax import sequence
from tuna2_jax.model import vision_encoder as ve
from tuna2_jax.model.config import ConfigError, ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

# torch.nn.functional.interpolate of the 4 basis vectors of a length-4 axis (torch 2.13), rows = outputs.
TORCH_WEIGHTS = {
    ("bilinear", 3): [[0.7, 0.3, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.3, 0.7]],   # antialias=True
    ("bilinear", 6): [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.833333, 0.166667, 0.0],
                      [0.0, 0.166667, 0.833333, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]],
    ("bicubic", 3): [[0.856482, 0.16088, -0.017361, 0.0], [-0.09375, 0.59375, 0.59375, -0.09375],
                     [0.0, -0.017361, 0.160879, 0.856482]],
    ("bicubic", 6): [[1.086806, -0.086806, 0.0, 0.0], [0.5, 0.59375, -0.09375, 0.0],
                     [-0.086805, 0.943287, 0.16088, -0.017361], [-0.017361, 0.16088, 0.943287, -0.086806],
                     [0.0, -0.09375, 0.59375, 0.5], [0.0, 0.0, -0.086805, 1.086805]],
}
CFG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=48, patch_size=4, time_embed_dim=16, flow_layers=1, flow_heads=2, flow_kv_heads=1,
                  flow_head_dim=16, flow_mlp_dim=48, variant="tuna_r", vision_hidden_size=24,
                  vision_num_layers=3, vision_num_heads=3, vision_mlp_dim=40, vision_pos_grid=3)
FIELDS = ("modality", "image_ids", "attn_end", "positions")


@pytest.mark.parametrize("method, size", TORCH_WEIGHTS)
def test_resize_weights_match_torch(method: str, size: int):
  w = ve.RESIZE_WEIGHTS[method](jnp.arange(size), jnp.full(size, size), 4)
  np.testing.assert_allclose(w, TORCH_WEIGHTS[method, size], atol=2e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_to_the_table_grid_is_identity(method: str):
  w = ve.RESIZE_WEIGHTS[method](jnp.arange(5), jnp.full(5, 5), 5)
  np.testing.assert_allclose(w, np.eye(5), atol=1e-6)


def row(images, *, seq_len: int = 80, seed: int = 0) -> dict[str, np.ndarray]:
  """One packed row: text, then each image (grid h x w) followed by text."""
  rng = np.random.default_rng(seed)
  parts: list = [sequence.Text([6, 7])]
  for h, w in images:
    parts += [sequence.Image(rng.integers(0, 256, (4 * h, 4 * w, 3), dtype=np.uint8)), sequence.Text([8])]
  return sequence.stack_rows([sequence.pack_documents([parts], seq_len=seq_len, patch_size=4)])


def random_params(module: nn.Module, *args, seed: int = 0, **kw):
  """Random values of the module's param shapes (eval_shape: no init compile, which dominates on CPU)."""
  shapes = jax.eval_shape(lambda k: nn.meta.unbox(module.init(k, *args, **kw)["params"]), jax.random.key(0))
  rng = np.random.default_rng(seed)
  fill = lambda path, x: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                          + 0.2 * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def encoder():
  batch = row([(2, 3)])
  module = ve.VisionEncoder(CFG)
  params = random_params(module, pixels(batch), **{k: batch[k] for k in FIELDS})
  return jax.jit(lambda b, x, start=0: module.apply({"params": params}, x, **{k: b[k] for k in FIELDS},
                                                    start=start))


def pixels(batch) -> np.ndarray:
  return np.asarray(batch["patches"], np.float32) / 127.5 - 1


def patch_rows(batch, image_id: int) -> np.ndarray:
  return np.flatnonzero((batch["image_ids"][0] == image_id) & (batch["modality"][0] == sequence.PATCH))


def test_image_grid_is_read_at_the_last_patch():
  batch = row([(2, 3), (4, 1)])
  h, w = ve.image_grid(jnp.asarray(batch["positions"]), jnp.asarray(batch["attn_end"]))
  for image_id, grid in ((1, (2, 3)), (2, (4, 1))):
    idx = patch_rows(batch, image_id)
    assert set(np.asarray(h)[0, idx]) == {grid[0]} and set(np.asarray(w)[0, idx]) == {grid[1]}


def test_images_attend_only_to_themselves():
  """An image's features do not depend on the other images or the text of its row, nor on where it sits."""
  run = encoder()
  both = row([(2, 3), (3, 2)], seed=1)
  alone = row([(3, 2)], seed=2)
  a_idx, b_idx = patch_rows(both, 2), patch_rows(alone, 1)
  x_both, x_alone = pixels(both), pixels(alone)
  x_alone[0, b_idx] = x_both[0, a_idx]            # the same second image, alone and at another offset
  got_both, got_alone = np.asarray(run(both, x_both)), np.asarray(run(alone, x_alone))
  np.testing.assert_allclose(got_both[0, a_idx], got_alone[0, b_idx], rtol=1e-5, atol=1e-5)
  x_both[0, patch_rows(both, 1)] += 0.5           # changing image 1 leaves image 2 as it was
  changed = np.asarray(run(both, x_both))
  np.testing.assert_allclose(changed[0, a_idx], got_both[0, a_idx], rtol=1e-6, atol=1e-6)
  # The features also differ from a plain per-patch map: attention does mix the image's own patches.
  x_mod = pixels(both)
  x_mod[0, a_idx[0]] += 0.5
  assert np.abs(np.asarray(run(both, x_mod))[0, a_idx[1:]] - got_both[0, a_idx[1:]]).max() > 1e-4


def test_a_chunk_of_the_row_gives_the_same_features():
  """Cached inference recomputes an image span as a chunk: attn_end stays absolute, `start` shifts it."""
  run = encoder()
  batch = row([(2, 3), (3, 2)], seed=3)
  full = np.asarray(run(batch, pixels(batch)))
  idx = patch_rows(batch, 2)
  lo, hi = idx[0] - 1, idx[-1] + 2                # TIME slot .. EOI of the second image
  chunk = {k: (v[:, :, lo:hi] if k == "positions" else v[:, lo:hi]) for k, v in batch.items()}
  got = np.asarray(run(chunk, pixels(batch)[:, lo:hi], lo))
  np.testing.assert_allclose(got[0, idx - lo], full[0, idx], rtol=1e-5, atol=1e-5)


def test_tuna_r_model_embeds_images_with_the_encoder():
  """The decoder input at patch positions is VisionEmbed's output (the TIME slot and text are untouched),
  and the encoder gets gradient through it; the rest of the model is Tuna-2's, tested elsewhere."""
  batch = row([(2, 3)], seed=4)
  model = Tuna2(CFG)
  params = random_params(model, batch, method=Tuna2.embed_inputs)
  assert "vision" in params and "patch_embed" not in params
  assert set(params["vision"]) == {"encoder", "connector"}
  idx = patch_rows(batch, 1)
  fields = {k: batch[k] for k in FIELDS}

  @jax.jit
  def run(p):
    embed = lambda p: model.apply({"params": p}, batch, method=Tuna2.embed_inputs)[0]
    grads = jax.grad(lambda p: jnp.mean(embed(p)[:, idx] ** 2))(p)
    want = ve.VisionEmbed(CFG).apply({"params": p["vision"]}, pixels(batch), **fields)
    return embed(p), want, grads["vision"]["encoder"]

  x, want, grads = jax.tree.map(np.asarray, run(params))
  np.testing.assert_allclose(x[0, idx], want[0, idx], rtol=1e-5, atol=1e-5)
  text = np.flatnonzero(batch["modality"][0] == sequence.TEXT)
  np.testing.assert_array_equal(x[0, text], params["embed"]["embedding"][batch["tokens"][0, text]])
  for name in ("patch_embed", "pos_embed", "layers"):
    g = jax.tree.leaves(grads[name])
    assert all(np.isfinite(a).all() for a in g) and any(np.abs(a).max() > 0 for a in g), name


def test_so400m_preset_matches_the_release_shapes():
  cfg = ModelConfig.from_dict(importlib.import_module("configs.tuna_r_7b").get_config().model.to_dict())
  shape = (cfg.vision_hidden_size, cfg.vision_kept_layers, cfg.vision_pos_grid, cfg.patch_size)
  assert shape == (1152, 26, 32, 16)
  batch = sequence.text_batch(np.zeros((1, 1), np.int32), cfg.patch_size)
  shapes = jax.eval_shape(lambda k: nn.meta.unbox(ve.VisionEmbed(cfg).init(
      k, jnp.zeros((1, 1, cfg.patch_dim)), **{f: batch[f] for f in FIELDS})["params"]), jax.random.key(0))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  d, f, n = 1152, 4304, 26
  layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)   # SigLIP encoder layer
  embeddings = 16 * 16 * 3 * d + d + 32 * 32 * d                     # Conv2d(3, d, 16) + 1024 positions
  assert count(shapes["encoder"]) == embeddings + n * layer
  assert count(shapes["connector"]) == d + (d * 3584 + 3584) + (3584 * 3584 + 3584)


@pytest.mark.parametrize("field, value, message", [
    ("vision_num_heads", 5, "model.vision_hidden_size .* divisible by model.vision_num_heads"),
    ("vision_feature_layer", -4, "model.vision_feature_layer"),
    ("vision_pos_resize", "nearest", "model.vision_pos_resize"),
    ("vision_pos_grid", 0, "model.vision_pos_grid"),
    ("variant", "tuna3", "model.variant"),
])
def test_bad_vision_field_is_named(field: str, value, message: str):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(CFG, **{field: value}).validate()
