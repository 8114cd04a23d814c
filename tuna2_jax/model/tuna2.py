"""The unified Tuna-2 model: a packed multimodal batch -> decoder hidden states -> text logits + pixels x̂.

Token ids, pixel embeddings (patch positions) and timestep embeddings (TIME slots) share one embedding
sequence and one Qwen2.5-shaped decoder. The LM head reads every position; the flow head (a DiT-style
transformer) reads the decoder's final-normed states and the TIME embeddings and predicts clean pixels.
`embed_inputs` is the only step that sees pixels, so an encoder-based variant replaces just that step.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax import sequence
from tuna2_jax.model import kv_cache
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.flow_head import FlowHead, output_to_patches
from tuna2_jax.model.layers import constrain, dense, dtype_of, logical_init, rope_tables
from tuna2_jax.model.patch_embed import PatchEmbed, TimestepEmbed, normalize_pixels
from tuna2_jax.model.transformer import Decoder
from tuna2_jax.model.vision_encoder import VisionEmbed


@flax.struct.dataclass
class Tuna2Output:
  hidden: jax.Array                 # [B, L, D] after the decoder's final RMSNorm
  logits: jax.Array | None = None   # [B, L, V] float32
  x_pred: jax.Array | None = None   # [B, L, p*p*3] float32: clean-pixel prediction x̂ in [-1, 1] space,
  #                                   spatial patch layout (the contract's `patches` order) at patch positions


@flax.struct.dataclass
class ModelCache:
  """Inference state of a batch of rows: decoder and flow-head KV buffers, and every key's segment id."""
  decoder: kv_cache.KVCache
  flow: kv_cache.KVCache | None
  segment_ids: jax.Array            # [B, C]


def init_cache(cfg: ModelConfig, batch: int, length: int, *, flow: bool = True) -> ModelCache:
  """An empty cache of `length` positions (segment 0 everywhere: nothing readable yet)."""
  dt = dtype_of(cfg.dtype)
  dec = kv_cache.KVCache.zeros(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim, dt)
  head = (kv_cache.KVCache.zeros(cfg.flow_layers, batch, length, cfg.flow_kv_heads, cfg.flow_head_dim, dt)
          if flow else None)
  return ModelCache(decoder=dec, flow=head, segment_ids=jnp.zeros((batch, length), jnp.int32))


def decoder_positions(batch: Mapping[str, jax.Array], cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """RoPE cos/sin tables [B, L, head_dim] from the contract's positions (1-D or M-RoPE)."""
  if cfg.rope == "mrope":
    pos = sequence.mrope_positions(batch["positions"], batch["attn_end"], batch["modality"])
    return rope_tables(pos, head_dim=cfg.head_dim, theta=cfg.rope_theta, sections=cfg.mrope_sections)
  return rope_tables(batch["positions"][:, 0], head_dim=cfg.head_dim, theta=cfg.rope_theta)


class Tuna2(nn.Module):
  """Encoder-free unified model: embeddings -> decoder -> {LM head, flow head}."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype_of(cfg.dtype),
                          param_dtype=dtype_of(cfg.param_dtype),
                          embedding_init=logical_init(nn.initializers.normal(0.02), ("vocab", "embed")))
    if cfg.variant == "tuna_r":
      # Tuna-R: a SigLIP-shaped ViT + connector reads every image (clean or noisy) instead of the patch embed.
      self.vision = VisionEmbed(cfg)
    else:
      self.patch_embed = PatchEmbed(cfg)
    self.time_embed = TimestepEmbed(cfg)
    # Masked visual feature learning: one learnable token, N(0, 1) / sqrt(D) as in the release.
    self.mask_token = self.param("mask_token", logical_init(nn.initializers.normal(cfg.hidden_size ** -0.5),
                                                            ("embed",)),
                                 (cfg.hidden_size,), dtype_of(cfg.param_dtype))
    self.decoder = Decoder(cfg)
    self.flow_head = FlowHead(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), cfg=cfg)

  def embed_inputs(self, batch: Mapping[str, jax.Array], *, pixels: jax.Array | None = None,
                   t: jax.Array | None = None, patch_mask: jax.Array | None = None,
                   start: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """(decoder input [B, L, D], TIME embedding of every position [B, L, D]).

    Text ids -> token embeddings; patches -> patch embedding + RMSNorm (then the mask token where
    `patch_mask`); TIME slots -> the timestep embedding of t. The TIME embeddings at all positions are the
    flow head's adaLN conditioning (t is constant over each image span).
    """
    cfg = self.cfg
    tokens, modality = batch["tokens"], batch["modality"]
    x = self.embed(tokens)
    if pixels is None:
      pixels = normalize_pixels(batch["patches"])
    if t is None:
      t = jnp.ones(tokens.shape, jnp.float32)
    if cfg.variant == "tuna_r":  # start: the chunk's row offset (extend), every image whole inside it
      patch_x = self.vision(pixels, modality=modality, image_ids=batch["image_ids"],
                            attn_end=batch["attn_end"], positions=batch["positions"], start=start)
    else:
      patch_x = self.patch_embed(pixels)
    if patch_mask is not None:
      patch_x = jnp.where(patch_mask[..., None], self.mask_token.astype(patch_x.dtype), patch_x)
    time_x = self.time_embed(t)
    mod = modality[..., None]
    x = jnp.where(mod == sequence.PATCH, patch_x, jnp.where(mod == sequence.TIME, time_x, x))
    return constrain(x, ("batch", "length", "embed")), time_x

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    out = self.embed.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def predict_pixels(self, hidden: jax.Array, cond: jax.Array, batch: Mapping[str, jax.Array], *,
                     cache: kv_cache.KVCache | None = None, k_segment: jax.Array | None = None,
                     start: jax.Array | int = 0) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """The flow head, then the output mapping to spatial patches."""
    cfg = self.cfg
    x_pred, cache = self.flow_head(hidden, cond=cond, modality=batch["modality"],
                                   positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   attn_end=batch["attn_end"], cache=cache, k_segment=k_segment,
                                   start=start)
    if cfg.unpatchify == "raster_chunks":
      x_pred = output_to_patches(x_pred, modality=batch["modality"], positions=batch["positions"],
                                 attn_end=batch["attn_end"], patch_size=cfg.patch_size, offset=start)
    return x_pred, cache

  def __call__(self, batch: Mapping[str, jax.Array], *, pixels: jax.Array | None = None,
               t: jax.Array | None = None, patch_mask: jax.Array | None = None, logits: bool = True,
               flow: bool = True) -> Tuna2Output:
    """batch: the contract's fields [B, L]. pixels: float [B, L, p*p*3] in pixel space ([-1, 1] for clean
    images; noised targets may leave it), default = normalised `batch["patches"]`. t: [B, L] timestep, one
    value per image span (1 = clean), default 1. patch_mask: bool [B, L], patches replaced by the mask
    token."""
    x, cond = self.embed_inputs(batch, pixels=pixels, t=t, patch_mask=patch_mask)
    cos, sin = decoder_positions(batch, self.cfg)
    hidden = self.decoder(x, cos=cos, sin=sin, segment_ids=batch["segment_ids"], attn_end=batch["attn_end"])
    x_pred = self.predict_pixels(hidden, cond, batch)[0] if flow else None
    return Tuna2Output(hidden=hidden, logits=self.lm_logits(hidden) if logits else None, x_pred=x_pred)

  def extend(self, batch: Mapping[str, jax.Array], cache: ModelCache, *, start: jax.Array | int,
             pixels: jax.Array | None = None, t: jax.Array | None = None, logits: bool = True,
             flow: bool = True) -> tuple[Tuna2Output, ModelCache]:
    """Inference on positions [start, start + S) of rows whose earlier positions are in `cache`.

    `batch` holds the contract's fields of those S positions (attn_end in absolute indices). Equals the
    full forward on the whole rows at those positions; the chunk's keys are written into the cache.
    """
    cfg = self.cfg
    x, cond = self.embed_inputs(batch, pixels=pixels, t=t, start=start)
    cos, sin = decoder_positions(batch, cfg)
    k_segment = kv_cache.write(cache.segment_ids, batch["segment_ids"], start)
    # The same parameters as `self.decoder`, run by a cache-aware mirror of transformer.Decoder.
    hidden, dec_cache = kv_cache.CachedDecoder(cfg, parent=None).apply(
        {"params": self.decoder.variables["params"]}, x, cache.decoder, cos=cos, sin=sin,
        attn_end=batch["attn_end"], segment_ids=batch["segment_ids"], k_segment=k_segment, start=start)
    x_pred, flow_cache = None, cache.flow
    if flow:
      x_pred, flow_cache = self.predict_pixels(hidden, cond, batch, cache=cache.flow, k_segment=k_segment,
                                               start=start)
    out = Tuna2Output(hidden=hidden, logits=self.lm_logits(hidden) if logits else None, x_pred=x_pred)
    return out, ModelCache(decoder=dec_cache, flow=flow_cache, segment_ids=k_segment)
