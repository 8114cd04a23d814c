"""Backend selection (auto per platform, logged fallbacks) and the kernel inside the scanned decoder."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.layouts import random_layout
from tuna2_jax.kernels import dispatch
from tuna2_jax.model.config import ConfigError, ModelConfig
from tuna2_jax.model.layers import rope_tables
from tuna2_jax.model.transformer import Decoder


@pytest.mark.parametrize("impl,platform,length,head_dim,dtype,want,fallback", [
    ("auto", "cpu", 512, 64, jnp.float32, "xla", False),
    ("auto", "cpu", 8192, 64, jnp.float32, "chunked", False),
    ("auto", "gpu", 8192, 128, jnp.bfloat16, "pallas", False),
    ("auto", "tpu", 8192, 128, jnp.bfloat16, "pallas", False),
    ("pallas", "gpu", 1024, 48, jnp.bfloat16, "chunked", True),     # Triton needs a power-of-two D
    ("cudnn", "cpu", 1024, 64, jnp.bfloat16, "xla", True),
    ("cudnn", "gpu", 1024, 64, jnp.float32, "pallas", True),
    ("cudnn", "gpu", 32768, 128, jnp.bfloat16, "pallas", True),     # dense mask too large
    ("cudnn", "gpu", 4096, 128, jnp.bfloat16, "cudnn", False),
    ("ring", "tpu", 4096, 128, jnp.bfloat16, "pallas", True),       # no sequence axis in the mesh
    ("chunked", "tpu", 4096, 128, jnp.bfloat16, "chunked", False),
])
def test_select(impl, platform, length, head_dim, dtype, want, fallback):
  choice, is_fallback = dispatch.select(impl, platform=platform, length=length, head_dim=head_dim,
                                        dtype=dtype)
  assert (choice.impl, is_fallback) == (want, fallback), choice.reason


def test_auto_picks_ring_on_a_sequence_mesh():
  mesh = jax.make_mesh((2, 4), ("data", "sequence"), devices=jax.devices()[:8])
  choice, fallback = dispatch.select("auto", platform="tpu", length=4096, head_dim=128, dtype=jnp.bfloat16,
                                     mesh=mesh)
  assert choice.impl == "ring" and not fallback


def test_fallback_is_logged(caplog):
  q = jnp.zeros((1, 32, 2, 8))
  seg, end = jnp.ones((1, 32), jnp.int32), jnp.arange(32)[None]
  dispatch._logged.clear()
  with caplog.at_level(logging.INFO):
    dispatch.attention(q, q, q, segment_ids=seg, attn_end=end, impl="cudnn")
  assert any("cudnn" in r.getMessage() and "GPU" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match="model.attention"):
    dispatch.attention(q, q, q, segment_ids=seg, attn_end=end, impl="flash3")


def test_config_validates_attention_fields():
  with pytest.raises(ConfigError, match="model.attention"):
    ModelConfig(attention="flash3").validate()
  with pytest.raises(ConfigError, match="model.attention_block_q"):
    ModelConfig(attention_block_q=100).validate()
  ModelConfig(attention="auto", attention_block_q=256, attention_block_k=512).validate()


def test_pallas_matches_xla_in_scanned_decoder():
  """The interpret-mode kernel inside nn.scan (and its VJP through the scan) equals the dense backend."""
  b, l = 2, 96
  seg, end = random_layout(np.random.default_rng(0), b, l)
  seg, end = jnp.asarray(seg), jnp.asarray(end)
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  x = jax.random.normal(jax.random.key(0), (b, l, 64))
  results = {}
  for impl in ("xla", "pallas"):
    cfg = ModelConfig(attention=impl, num_layers=2, scan_layers=True)
    cos, sin = rope_tables(pos, head_dim=cfg.head_dim, theta=cfg.rope_theta)
    model = Decoder(cfg)
    params = model.init(jax.random.key(1), x, cos=cos, sin=sin, segment_ids=seg, attn_end=end)
    def loss(p, x, model=model, cos=cos, sin=sin):
      return jnp.sum(model.apply(p, x, cos=cos, sin=sin, segment_ids=seg, attn_end=end) ** 2)

    results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  (lx, gx), (lp, gp) = results["xla"], results["pallas"]
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  for a, b_ in zip(jax.tree.leaves(gp), jax.tree.leaves(gx), strict=False):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-4, rtol=1e-4)
