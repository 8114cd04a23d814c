"""The Qwen2.5-shaped decoder: pre-norm blocks stacked with `nn.scan`, remat policy from config."""

from __future__ import annotations

import flax.linen as nn
import jax

from tuna2_jax.model.attention import Attention
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import MLP, RMSNorm, constrain, dtype_of

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nn.Module):
  """x + attn(norm(x)); then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
               attn_end: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
    h = Attention(cfg, name="attn")(norm("attn_norm")(x), cos=cos, sin=sin, segment_ids=segment_ids,
                                    attn_end=attn_end)
    x = constrain(x + h, ("batch", "length", "embed"))
    x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
    return constrain(x, ("batch", "length", "embed")), None


class Decoder(nn.Module):
  """num_layers DecoderBlocks (scanned: params get a leading 'layers' axis) and the final RMSNorm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
               attn_end: jax.Array) -> jax.Array:
    cfg = self.cfg
    block = DecoderBlock
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    args = (cos, sin, segment_ids, attn_end)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * len(args), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, *args)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, *args)
    return RMSNorm(cfg.rms_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="final_norm")(x)
