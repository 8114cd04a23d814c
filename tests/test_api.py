"""tuna2_jax.api against the HF Qwen2 golden fixtures (tests/golden, written by make_golden.py)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.convert import GOLDEN_DIR, golden, qwen2_fixtures
from tuna2_jax import api, sample, sequence
from tuna2_jax.convert import hf_qwen2
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

ATOL = 1e-4  # float32 logits of O(10)


@pytest.mark.parametrize("name", qwen2_fixtures())
def test_hf_directory_matches_golden_logits(name: str):
  model = api.from_pretrained(GOLDEN_DIR / name)
  tokens, want = golden(name)
  got = model.text_logits(tokens)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)
  assert model.report is not None and "time_embed/fc1/kernel" in model.report.initialized


def test_native_checkpoint_gives_the_same_logits(tmp_path: pathlib.Path):
  name = "qwen2_gqa3_tied"
  hf = api.from_pretrained(GOLDEN_DIR / name)
  hf_qwen2.save_native(tmp_path, hf.config, hf.params)
  native = api.from_pretrained(tmp_path)
  assert native.config == hf.config and native.report is None
  tokens, want = golden(name)
  np.testing.assert_array_equal(np.asarray(native.text_logits(tokens)), np.asarray(hf.text_logits(tokens)))
  # bfloat16: parameters and compute in bf16, logits still float32 and close to HF's.
  bf16 = api.from_pretrained(tmp_path, dtype="bfloat16")
  got = np.asarray(bf16.text_logits(tokens))
  assert bf16.config.dtype == "bfloat16" and got.dtype == np.float32
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_unrecognised_path_says_what_was_expected(tmp_path: pathlib.Path):
  (tmp_path / "config.json").write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="Expected a native checkpoint.*Hugging Face Qwen2"):
    api.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="no such directory"):
    api.from_pretrained(tmp_path / "missing")


def test_text_logits_rejects_bad_tokens():
  model = api.from_pretrained(GOLDEN_DIR / "qwen2_gqa3_tied")
  with pytest.raises(ValueError, match=r"\[0, 97\)"):
    model.text_logits(np.array([[1, 97]], np.int32))
  with pytest.raises(ValueError, match=r"integer \[B, L\]"):
    model.text_logits(np.array([1, 2], np.int32))


def test_generation_methods_delegate_to_the_samplers():
  """The API object gives what the sample module gives for the same parameters."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, patch_size=4, flow_layers=1, flow_heads=2, flow_kv_heads=1, flow_head_dim=16,
                    flow_mlp_dim=64)
  batch = jax.tree.map(jnp.asarray, sequence.text_batch(np.zeros((1, 8), np.int32), 4))
  params = Tuna2(cfg).init(jax.random.key(0), batch)["params"]
  model = api.Pretrained(cfg, params)
  prompts = [[10, 11, 12]]
  assert model.generate_text(prompts, max_new_tokens=3) == sample.generate_text(params, cfg, prompts,
                                                                                 max_new_tokens=3)
  img = model.generate_image(prompts, height=8, width=4, steps=2, cfg_scale=1.0)
  np.testing.assert_array_equal(img, sample.generate_image(params, cfg, prompts, height=8, width=4, steps=2,
                                                           cfg_scale=1.0))
  assert model.reconstruct(img[0], steps=2).shape == (8, 4, 3)
