"""Inference: KV-cache decoding and prefix-cached generation equal recomputation; CFG; overfitting."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tuna2_jax import losses, sample, sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, flow_layers=2, flow_heads=4, flow_kv_heads=2, flow_head_dim=8, flow_mlp_dim=64,
                  patch_size=4)
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8)


def _init(cfg, seed=0, scale=0.05):
  doc = [sequence.Text([1, 2]), sequence.Image(np.zeros((4, 4, 3), np.uint8), "generate")]
  row = sequence.pack_documents([doc], seq_len=8, patch_size=cfg.patch_size)
  batch = jax.tree.map(jnp.asarray, sequence.stack_rows([row]))
  params = nn.unbox(jax.jit(Tuna2(cfg).init)(jax.random.key(seed), batch)["params"])
  if not scale:
    return params
  # Random non-zero weights everywhere (the flow head's output is zero at init).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape)
                            for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def params():
  return _init(CFG)


def test_kv_cache_decoding_equals_recomputation(params):
  prompts = [[10, 11, 12, 13, 14], [20, 5, 21]]          # the second holds an image placeholder (id 5)
  kw = dict(images=[[], [IMG]], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
  cached = sample.generate_text(params, CFG, prompts, **kw)
  full = sample.generate_text(params, CFG, prompts, use_cache=False, **kw)
  assert cached == full
  assert len(cached) == 2 and all(len(r) <= 6 for r in cached)


def _rows(docs):
  return {k: jnp.asarray(v) for k, v in sample.pack_left(docs, patch_size=4, special=sequence.SpecialTokens(),
                                                         drop_last=1).items()}


def test_cached_prefix_generation_equals_full_recomputation(params):
  sp = sequence.SpecialTokens()
  # Editing with CFG: [BOS][source] instruction [target] and the unconditional [BOS][source][target].
  docs = [sample.generation_document([30, 31, 32], 8, 12, sp, IMG),
          sample.generation_document([], 8, 12, sp, IMG)]
  rows = _rows(docs)
  z0 = 2.0 * jax.random.normal(jax.random.key(0), (1, 6, 48))
  kw = dict(cfg=CFG, steps=4, sampler="heun", guided=True, cfg_scale=2.0, cfg_interval=(0.0, 1.0),
            time_shift=1.0, t_eps=0.05)
  cached = np.asarray(sample.sample_patches(params, rows, z0, use_cache=True, **kw))
  full = np.asarray(sample.sample_patches(params, rows, z0, use_cache=False, **kw))
  assert np.abs(cached - np.asarray(z0)).max() > 0.1
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_cfg_scale_one_equals_the_conditional_branch(params):
  sp = sequence.SpecialTokens()
  cond = sample.generation_document([30, 31], 8, 8, sp)
  both, alone = _rows([cond, sample.generation_document([], 8, 8, sp)]), _rows([cond])
  z0 = 2.0 * jax.random.normal(jax.random.key(1), (1, 4, 48))
  kw = dict(cfg=CFG, steps=3, sampler="euler", cfg_interval=(0.0, 1.0), time_shift=1.0, t_eps=0.05,
            use_cache=True)
  guided = sample.sample_patches(params, both, z0, guided=True, cfg_scale=1.0, **kw)
  plain = sample.sample_patches(params, alone, z0, guided=False, cfg_scale=1.0, **kw)
  np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_one_caption_image_pair():
  """Train on one caption -> 16x16 image pair on CPU until the generated image reaches PSNR >= 25 dB."""
  cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    mlp_dim=128, flow_layers=2, flow_heads=4, flow_kv_heads=2, flow_head_dim=16,
                    flow_mlp_dim=128,
                    patch_size=4)
  yy, xx = np.mgrid[0:16, 0:16]
  disc = np.where((xx - 8) ** 2 + (yy - 8) ** 2 < 20, 230, 30)
  image = np.stack([xx * 16, yy * 16, disc], -1).astype(np.uint8)
  caption = [40, 41, 42, 43]
  sp = sequence.SpecialTokens()
  doc = [sequence.Text([sp.bos, *caption], loss=False), sequence.Image(image, "generate")]
  row = sequence.pack_documents([doc], seq_len=24, patch_size=4)
  batch = jax.tree.map(jnp.asarray, sequence.stack_rows([row] * 8))
  config = ml_collections.ConfigDict(dict(train=dict(
      steps=250, text_loss_weight=1.0, flow_loss_weight=1.0, flow_p_mean=-0.8, flow_p_std=0.8,
      noise_scale=1.0, t_eps=0.05, und_noise_prob=0.0, und_noise_max=0.1, mask_last_fraction=0.0,
      mask_prob=0.0, mask_ratio_min=0.0, mask_ratio_max=0.0)))
  model = Tuna2(cfg)
  params = _init(cfg, seed=0, scale=0.0)
  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, rng):
    (loss, _), grads = jax.value_and_grad(
        lambda p: losses.compute_loss(p, batch, rng, model=model, config=config, step=jnp.asarray(0)),
        has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  start = time.time()
  for i in range(config.train.steps):
    params, state, loss = step(params, state, jax.random.key(i))
  out = sample.generate_image(params, cfg, caption, height=16, width=16, steps=10, cfg_scale=1.0,
                              noise_scale=1.0)[0]
  value = sample.psnr(out, image)
  print(f"overfit: loss {float(loss):.4f}, PSNR {value:.1f} dB, {time.time() - start:.1f} s")
  assert value >= 25.0


def test_command_line_writes_what_the_functions_return(tmp_path, capsys):
  from PIL import Image as PILImage

  from tuna2_jax.convert import hf_qwen2
  from tuna2_jax.input import tokenizer as tokenizer_lib

  cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": 300})   # room for the byte tokenizer's ids
  params = _init(cfg)
  hf_qwen2.save_native(tmp_path / "ckpt", cfg, params)
  tok = tokenizer_lib.tokenizer_from_name("byte")
  ids = tok.encode("a red circle")
  common = dict(height=8, width=12, steps=2, sampler="euler", seed=3, special=tok.special)
  sample.main(["image", f"--ckpt={tmp_path / 'ckpt'}", "--prompt=a red circle", "--height=8", "--width=12",
               "--steps=2", "--seed=3", f"--out={tmp_path / 'gen.png'}"])
  want = sample.generate_image(params, cfg, [ids], cfg_scale=3.0, **common)[0]
  np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "gen.png")), want)
  PILImage.fromarray(IMG).save(tmp_path / "src.png")
  sample.main(["edit", f"--ckpt={tmp_path / 'ckpt'}", "--prompt=make it blue",
               f"--image={tmp_path / 'src.png'}", "--steps=2", "--seed=3", f"--out={tmp_path / 'edit.png'}"])
  assert np.asarray(PILImage.open(tmp_path / "edit.png")).shape == IMG.shape
  sample.main(["text", f"--ckpt={tmp_path / 'ckpt'}", "--prompt=how many?", f"--image={tmp_path / 'src.png'}",
               "--max_new_tokens=4", f"--out={tmp_path / 'answer.txt'}"])
  answer = sample.generate_text(params, cfg, [tok.encode("how many?")], images=[[IMG]], max_new_tokens=4,
                                special=tok.special)[0]
  assert (tmp_path / "answer.txt").read_text() == tok.decode(answer) + "\n"
