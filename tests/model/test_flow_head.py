"""The flow head: adaLN-Zero at init, modulation only in image spans, its RoPE, the raster-chunk mapping."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuna2_jax import sequence
from tuna2_jax.model.config import ConfigError, ModelConfig
from tuna2_jax.model.flow_head import apply_interleaved_rope, head_rope_tables, output_to_patches
from tuna2_jax.model.tuna2 import Tuna2

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  mlp_dim=32, flow_layers=2, flow_heads=4, flow_kv_heads=2, flow_head_dim=8, flow_mlp_dim=48,
                  patch_size=4)


def _batch():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
  doc = [sequence.Text([1, 9, 10, 11]), sequence.Image(img, "generate")]
  return jax.tree.map(jnp.asarray, sequence.stack_rows([sequence.pack_documents([doc], seq_len=20,
                                                                                patch_size=4)]))


def _perturb(tree, key, scale=0.1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape)
                            for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def setup():
  batch = _batch()
  model = Tuna2(CFG)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  return model, params, batch


def test_output_is_zero_at_init(setup):
  model, params, batch = setup
  out = model.apply({"params": params}, batch, t=jnp.full(batch["tokens"].shape, 0.3))
  assert out.x_pred.shape == (1, 20, 48)
  np.testing.assert_array_equal(np.asarray(out.x_pred), 0.0)
  # Zero-init adaLN: every block starts as the identity on image positions (gate 0).
  for name in ("adaln", "final_adaln"):
    tree = params["flow_head"]["layers"]["adaln"] if name == "adaln" else params["flow_head"][name]
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(tree))


def test_modulation_touches_only_image_positions(setup):
  model, params, batch = setup
  params = _perturb(params, jax.random.key(1))          # every weight non-zero, the head's output too
  t = jnp.full(batch["tokens"].shape, 0.3)
  base = np.asarray(model.apply({"params": params}, batch, t=t).x_pred)
  head = dict(params["flow_head"])
  head["layers"] = dict(head["layers"], adaln=_perturb(head["layers"]["adaln"], jax.random.key(2)))
  head["final_adaln"] = _perturb(head["final_adaln"], jax.random.key(3))
  moved = np.asarray(model.apply({"params": dict(params, flow_head=head)}, batch, t=t).x_pred)
  other_t = np.asarray(model.apply({"params": params}, batch, t=jnp.full_like(t, 0.8)).x_pred)
  mod = np.asarray(batch["modality"][0])
  before_image = np.arange(20) < np.flatnonzero(mod == sequence.TIME)[0]   # text that cannot see the image
  span = (mod == sequence.TIME) | (mod == sequence.PATCH)
  for changed in (moved, other_t):
    np.testing.assert_allclose(changed[0, before_image], base[0, before_image], rtol=1e-6, atol=1e-6)
    assert np.abs(changed[0, span] - base[0, span]).max() > 1e-3


def test_interleaved_rope_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 2, 6)).astype(np.float32)
  ang = rng.uniform(-3, 3, (1, 3, 3)).astype(np.float32)
  cos, sin = np.repeat(np.cos(ang), 2, -1), np.repeat(np.sin(ang), 2, -1)
  got = np.asarray(apply_interleaved_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin)))
  x0, x1 = x[..., 0::2], x[..., 1::2]
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  want = np.stack([x0 * c + x1 * s, -x0 * s + x1 * c], -1).reshape(x.shape)   # rotation by -angle
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_tables_by_kind():
  cfg = dataclasses.replace(CFG, flow_head_dim=16, flow_text_rope_scaling=1.0)
  batch = _batch()
  tables = jax.tree.map(np.asarray, head_rope_tables(batch["positions"], batch["modality"], cfg))
  mod = np.asarray(batch["modality"][0])
  time_slot = np.flatnonzero(mod == sequence.TIME)
  patch = np.flatnonzero(mod == sequence.PATCH)
  text = np.flatnonzero(mod == sequence.TEXT)
  # TIME: no rotation at all; text: only the 1-D table; patches: only the 3-D table.
  for name, rows, identity in (("text", time_slot, True), ("patch", time_slot, True),
                               ("patch", text, True), ("text", patch, True), ("text", text[1:], False)):
    is_id = np.allclose(tables[f"{name}_cos"][0, rows], 1) and np.allclose(tables[f"{name}_sin"][0, rows], 0)
    assert is_id == identity, (name, rows)
  # 3-D: sections (frame, row, col) = (2, 3, 3) pairs for head_dim 16; frame 0 -> those pairs unrotated.
  row, col = np.asarray(batch["positions"][0, 1]), np.asarray(batch["positions"][0, 2])
  j = patch[4]
  ang = np.concatenate([[0.0, 0.0], row[j] * 1e4 ** -(np.arange(0, 6, 2) / 6),
                        col[j] * 1e4 ** -(np.arange(0, 6, 2) / 6)])
  np.testing.assert_allclose(tables["patch_cos"][0, j], np.repeat(np.cos(ang), 2), rtol=1e-5, atol=1e-6)
  pos = np.asarray(batch["positions"][0, 0])
  k = text[2]
  ang = pos[k] * 5e5 ** -(np.arange(0, 16, 2) / 16)
  np.testing.assert_allclose(tables["text_sin"][0, k], np.sin(np.concatenate([ang, ang])), rtol=1e-5,
                             atol=1e-6)


def test_raster_chunks_mapping_is_the_releases_reshape():
  p, h, w = 4, 2, 3
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (h * p, w * p, 3), dtype=np.uint8)
  doc = [sequence.Text([1, 2]), sequence.Image(img, "generate")]
  batch = sequence.stack_rows([sequence.pack_documents([doc], seq_len=14, patch_size=p)])
  first = int(np.flatnonzero(batch["modality"][0] == sequence.PATCH)[0])
  # The release: output token k holds raster pixels [k p^2, (k+1) p^2) of the image, channels last.
  raster = img.reshape(h * w, p * p * 3).astype(np.float32)
  x = np.zeros((1, 14, p * p * 3), np.float32)
  x[0, first:first + h * w] = raster
  got = np.asarray(output_to_patches(jnp.asarray(x), modality=batch["modality"], positions=batch["positions"],
                                     attn_end=batch["attn_end"], patch_size=p))
  np.testing.assert_array_equal(got[0, first:first + h * w], sequence.patchify(img, p))
  np.testing.assert_array_equal(got[0, :first], x[0, :first])


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="flow_kv_heads"):
    ModelConfig(flow_heads=4, flow_kv_heads=3).validate()
  with pytest.raises(ConfigError, match="unpatchify"):
    ModelConfig(unpatchify="nope").validate()  # type: ignore[arg-type]
  with pytest.raises(ConfigError, match="flow_rope_section"):
    ModelConfig(flow_rope_section=(1, 1, 1)).validate()
