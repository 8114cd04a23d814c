"""The unified Tuna-2 model: a packed multimodal batch -> decoder hidden states -> text logits.

Token ids, pixel embeddings (patch positions) and timestep embeddings (TIME slots) share one embedding
sequence and one Qwen2.5-shaped decoder. The flow head reads `Tuna2Output.hidden` at image positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax import sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import constrain, dense, dtype_of, logical_init, rope_tables
from tuna2_jax.model.patch_embed import PatchEmbed, TimestepEmbed, normalize_pixels
from tuna2_jax.model.transformer import Decoder


@flax.struct.dataclass
class Tuna2Output:
  hidden: jax.Array                 # [B, L, D] after the decoder's final RMSNorm
  logits: jax.Array | None = None   # [B, L, V] float32


def decoder_positions(batch: Mapping[str, jax.Array], cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """RoPE cos/sin tables [B, L, head_dim] from the contract's positions (1-D or M-RoPE)."""
  if cfg.rope == "mrope":
    pos = sequence.mrope_positions(batch["positions"], batch["attn_end"], batch["modality"])
    return rope_tables(pos, head_dim=cfg.head_dim, theta=cfg.rope_theta, sections=cfg.mrope_sections)
  return rope_tables(batch["positions"][:, 0], head_dim=cfg.head_dim, theta=cfg.rope_theta)


class Tuna2(nn.Module):
  """Encoder-free unified model: embeddings -> decoder -> LM head (and hidden states for the flow head)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, pixels: jax.Array | None = None,
               t: jax.Array | None = None, logits: bool = True) -> Tuna2Output:
    """batch: the contract's fields [B, L]. pixels: float [B, L, p*p*3] in pixel space ([-1, 1] for clean
    images; noised targets may leave it), default = normalised `batch["patches"]`. t: [B, L] timestep read
    at TIME slots (1 = clean), default 1."""
    cfg = self.cfg
    tokens, modality = batch["tokens"], batch["modality"]
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                     param_dtype=dtype_of(cfg.param_dtype),
                     embedding_init=logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed")
    x = embed(tokens)
    if pixels is None:
      pixels = normalize_pixels(batch["patches"])
    if t is None:
      t = jnp.ones(tokens.shape, jnp.float32)
    patch_x = PatchEmbed(cfg, name="patch_embed")(pixels)
    time_x = TimestepEmbed(cfg, name="time_embed")(t)
    mod = modality[..., None]
    x = jnp.where(mod == sequence.PATCH, patch_x, jnp.where(mod == sequence.TIME, time_x, x))
    x = constrain(x, ("batch", "length", "embed"))

    cos, sin = decoder_positions(batch, cfg)
    hidden = Decoder(cfg, name="decoder")(x, cos=cos, sin=sin, segment_ids=batch["segment_ids"],
                                          attn_end=batch["attn_end"])
    if not logits:
      return Tuna2Output(hidden=hidden)
    if cfg.tie_embeddings:
      out = embed.attend(hidden)
    else:
      out = dense(cfg.vocab_size, ("embed", "vocab"), cfg=cfg, name="lm_head")(hidden)
    out = constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
    return Tuna2Output(hidden=hidden, logits=out)
