"""Tuna-R's representation encoder: a SigLIP-shaped ViT on the packed contract, and its connector.

The ViT computes what HF `Siglip2VisionModel` / `SiglipVisionModel` compute up to `hidden_states[-2]` (the
release keeps 26 of So400M's 27 layers and drops the post-LayerNorm and the pooling head): linear embedding of
each flattened (row, col, channel) patch + a learned square position table resized to the image's patch grid,
then pre-LN blocks (biased multi-head attention, GELU-tanh MLP).

Packed rows: the patches of one image are the PATCH positions sharing an `image_ids` value; they attend to
each other only, through the same `attend` backends as the decoder (segment_ids = image id at patches, 0
elsewhere; attn_end = the image's last patch, which the contract already stores there). The grid of an image
is read at its last patch (raster order: row = H - 1, col = W - 1), so any-res images need no static shapes.
The ViT runs over all L positions (text and TIME rows are fully masked and ignored); images dominate Tuna-R
rows, so compacting patches first would save little and cost a static per-row patch budget.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tuna2_jax import sequence
from tuna2_jax.model.attention import attend
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import RMSNorm, constrain, dense, dtype_of, logical_init
from tuna2_jax.model.transformer import REMAT_POLICIES

_CUBIC_A = -0.75  # torch's bicubic coefficient (PIL and jax.image use -0.5)
# The connector's RMSNorm eps: the release's RMSNorm default.
CONNECTOR_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------
# Position-table resize with a traced target size: one weight row over the source grid per output index.


def bilinear_weights(out_index: jax.Array, out_size: jax.Array, grid: int) -> jax.Array:
  """Weights [..., grid] of F.interpolate(bilinear, align_corners=False, antialias=True) along one axis.

  The antialiased triangle filter widens to `scale` source pixels when downsampling (SigLIP2 NaFlex).
  """
  out_size = jnp.maximum(out_size, 1).astype(jnp.float32)
  scale = grid / out_size
  support = jnp.maximum(scale, 1.0)
  center = (out_index.astype(jnp.float32) + 0.5) * scale - 0.5
  source = jnp.arange(grid, dtype=jnp.float32)
  w = jnp.maximum(1.0 - jnp.abs(source - center[..., None]) / support[..., None], 0.0)
  return w / w.sum(-1, keepdims=True)


def bicubic_weights(out_index: jax.Array, out_size: jax.Array, grid: int) -> jax.Array:
  """Weights [..., grid] of torch's F.interpolate(bicubic, align_corners=False) along one axis.

  Four taps around the unclamped source coordinate, a = -0.75, indices clamped to the border, no antialias
  (SigLIP's interpolate_pos_encoding, which the release's Tuna-R calls for any-res input).
  """
  out_size = jnp.maximum(out_size, 1).astype(jnp.float32)
  src = (out_index.astype(jnp.float32) + 0.5) * (grid / out_size) - 0.5
  base = jnp.floor(src)
  t = src - base
  a = _CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1            # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a        # 1 < |x| < 2
  coeffs = (far(t + 1), near(t), near(1 - t), far(2 - t))
  source = jnp.arange(grid)
  w = 0.0
  for k, c in enumerate(coeffs):
    idx = jnp.clip(base.astype(jnp.int32) - 1 + k, 0, grid - 1)
    w = w + c[..., None] * (idx[..., None] == source)
  return w


RESIZE_WEIGHTS = {"bilinear": bilinear_weights, "bicubic": bicubic_weights}


def image_grid(positions: jax.Array, attn_end: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Patch-grid height and width [B, L] of each position's image, read at the image's last patch."""
  last = jnp.clip(attn_end, 0, positions.shape[-1] - 1)
  height = jnp.take_along_axis(positions[:, 1], last, axis=-1) + 1
  width = jnp.take_along_axis(positions[:, 2], last, axis=-1) + 1
  return height, width


def resized_positions(table: jax.Array, positions: jax.Array, attn_end: jax.Array, method: str) -> jax.Array:
  """The [G, G, D] table resized to each image's grid and read at each patch: [B, L, D] (float32)."""
  g = table.shape[0]
  height, width = image_grid(positions, attn_end)
  weights = RESIZE_WEIGHTS[method]
  wy = weights(positions[:, 1], height, g)                              # [B, L, G]
  wx = weights(positions[:, 2], width, g)                               # [B, L, G]
  # Separable resize = one [L, G*G] x [G*G, D] matmul: no [L, G, D] intermediate.
  w = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:-1], g * g)
  return w @ table.reshape(g * g, -1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# The ViT.


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  # float32 statistics, as torch computes LayerNorm; the block casts back to cfg.dtype.
  return nn.LayerNorm(epsilon=cfg.vision_ln_eps, dtype=jnp.float32, param_dtype=dtype_of(cfg.param_dtype),
                      scale_init=logical_init(nn.initializers.ones, ("embed",)),
                      bias_init=logical_init(nn.initializers.zeros, ("embed",)), name=name)


def _dense(features, names, cfg: ModelConfig, name: str, axis=-1) -> nn.DenseGeneral:
  # SigLIP's Linear layers all carry a bias; lecun-normal keeps activations O(1) from scratch.
  return dense(features, names, cfg=cfg, use_bias=True, axis=axis, name=name,
               kernel_init=nn.initializers.lecun_normal())


class VisionBlock(nn.Module):
  """SigLIP encoder layer: x + attn(LN(x)); then x + fc2(gelu_tanh(fc1(LN(x))))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, attn_end: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    heads = cfg.vision_num_heads
    head_dim = cfg.vision_hidden_size // heads
    h = _layer_norm(cfg, "ln1")(x).astype(dt)
    q, k, v = (_dense((heads, head_dim), ("embed", "heads", "head_dim"), cfg, n)(h) for n in ("q", "k", "v"))
    q, k, v = (constrain(a, ("batch", "length", "heads", "head_dim")) for a in (q, k, v))
    a = attend(q, k, v, segment_ids=segment_ids, attn_end=attn_end, cfg=cfg)
    a = _dense(cfg.vision_hidden_size, ("heads", "head_dim", "embed"), cfg, "o", axis=(-2, -1))(a)
    x = constrain(x + a, ("batch", "length", "embed"))
    h = _layer_norm(cfg, "ln2")(x).astype(dt)
    h = nn.gelu(_dense(cfg.vision_mlp_dim, ("embed", "mlp"), cfg, "fc1")(h), approximate=True)
    h = constrain(h, ("batch", "length", "mlp"))
    x = x + _dense(cfg.vision_hidden_size, ("mlp", "embed"), cfg, "fc2")(h)
    return constrain(x, ("batch", "length", "embed")), None


class VisionEncoder(nn.Module):
  """SigLIP-shaped ViT over the patch positions of a packed batch -> features [B, L, vision_hidden_size].

  Values at non-patch positions are meaningless (callers select patches by `modality`).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, *, modality: jax.Array, image_ids: jax.Array, attn_end: jax.Array,
               positions: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """pixels [B, L, p*p*3] (clean in [-1, 1] or noised); positions [B, 3, L]; the rest [B, L].

    start: row index of the first position when the arrays are a chunk of the row (cached inference);
    attn_end stays absolute. Every image must lie whole inside the chunk.
    """
    cfg = self.cfg
    attn_end = attn_end - start  # chunk-local: the ViT never looks outside its images
    dt = dtype_of(cfg.dtype)
    d = cfg.vision_hidden_size
    x = _dense(d, ("patch", "embed"), cfg, "patch_embed")(pixels.astype(dt))
    table = self.param("pos_embed", logical_init(nn.initializers.normal(d ** -0.5), (None, None, "embed")),
                       (cfg.vision_pos_grid, cfg.vision_pos_grid, d), dtype_of(cfg.param_dtype))
    pos = resized_positions(table, positions, attn_end, cfg.vision_pos_resize)
    x = constrain((x.astype(jnp.float32) + pos).astype(dt), ("batch", "length", "embed"))

    # Attention stays inside an image: segment = image id at its patches (TIME slots and text get 0).
    segment_ids = jnp.where(modality == sequence.PATCH, image_ids, 0)
    block = VisionBlock
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.vision_kept_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, segment_ids, attn_end)
    else:
      for i in range(cfg.vision_kept_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, segment_ids, attn_end)
    return x


class Connector(nn.Module):
  """ViT features -> decoder width: RMSNorm -> Linear -> GELU (erf) -> Linear (the release's siglip_proj)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    cfg = self.cfg
    h = RMSNorm(CONNECTOR_NORM_EPS, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name="norm")(feats)
    h = dense(cfg.hidden_size, ("embed", "mlp"), cfg=cfg, use_bias=True, name="fc1",
              kernel_init=nn.initializers.xavier_uniform())(h)
    h = nn.gelu(h, approximate=False)
    return dense(cfg.hidden_size, ("mlp", "embed"), cfg=cfg, use_bias=True, name="fc2",
                 kernel_init=nn.initializers.xavier_uniform())(h)


class VisionEmbed(nn.Module):
  """Tuna-R's image embedding: VisionEncoder then Connector, [B, L, hidden_size] at patch positions."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, pixels: jax.Array, *, modality: jax.Array, image_ids: jax.Array, attn_end: jax.Array,
               positions: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    feats = VisionEncoder(self.cfg, name="encoder")(pixels, modality=modality, image_ids=image_ids,
                                                    attn_end=attn_end, positions=positions, start=start)
    return Connector(self.cfg, name="connector")(feats)
