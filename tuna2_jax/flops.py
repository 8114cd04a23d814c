"""Model FLOPs per step and MFU.

Counted as 2 FLOPs per multiply-accumulate of every matmul the model needs (projections, MLPs, LM head,
pixel and timestep embeddings where they are used), plus attention QK^T and PV over the pairs the hybrid mask
actually allows (counted in O(L) from the contract, not L^2). Training = 3 x forward (backward = 2 x forward);
recomputation from remat is not counted, as is conventional for MFU.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tuna2_jax import sequence
from tuna2_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, keyed by a substring of `jax.Device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),   # v6e
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5", 459e12),        # v5p
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak FLOP/s of one device, or None where unknown (CPU: report tokens/s only)."""
  for key, value in PEAK_FLOPS:
    if key in device_kind:
      return value
  return None


def allowed_pairs(segment_ids: np.ndarray, attn_end: np.ndarray, positions: np.ndarray) -> int:
  """Number of (q, k) pairs the mask allows: keys of q are [doc_start(q), attn_end(q)] in its document."""
  length = segment_ids.shape[-1]
  doc_start = np.arange(length) - positions[..., 0, :]
  return int(np.sum(np.where(segment_ids > 0, attn_end - doc_start + 1, 0)))


def _block_flops_per_token(d: int, heads: int, kv_heads: int, head_dim: int, mlp: int) -> int:
  proj = d * heads * head_dim * 2 + 2 * d * kv_heads * head_dim
  return 2 * (proj + 3 * d * mlp)


def image_pairs(image_ids: np.ndarray, modality: np.ndarray) -> int:
  """Sum over images of N_patches^2: the pairs the vision encoder's per-image attention computes."""
  ids = np.where(modality == sequence.PATCH, image_ids, 0)
  total = 0
  for row in ids.reshape(-1, ids.shape[-1]):
    counts = np.bincount(row[row > 0])
    total += int(np.sum(counts.astype(np.int64) ** 2))
  return total


def forward_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray]) -> float:
  """Forward FLOPs of one batch of the contract."""
  seg, modality = np.asarray(batch["segment_ids"]), np.asarray(batch["modality"])
  tokens = int(np.sum(seg > 0))
  n_patch = int(np.sum(modality == sequence.PATCH))
  n_time = int(np.sum(modality == sequence.TIME))
  pairs = allowed_pairs(seg, np.asarray(batch["attn_end"]), np.asarray(batch["positions"]))
  d = cfg.hidden_size
  flops = cfg.num_layers * tokens * _block_flops_per_token(
      d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim)
  flops += cfg.num_layers * 4 * pairs * cfg.num_heads * cfg.head_dim   # QK^T and PV
  flops += 2 * tokens * d * cfg.vocab_size                               # LM head
  flops += 2 * n_time * (cfg.time_embed_dim * d + d * d)                 # TIME-slot MLP
  # The flow head runs over every token with the same mask (as the release), plus adaLN (6 D per block,
  # 2 D final) and the pixel projection.
  flow_block = _block_flops_per_token(d, cfg.flow_heads, cfg.flow_kv_heads, cfg.flow_head_dim,
                                      cfg.flow_mlp_dim) + 2 * d * 6 * d
  flops += cfg.flow_layers * (tokens * flow_block + 4 * pairs * cfg.flow_heads * cfg.flow_head_dim)
  flops += tokens * (2 * d * 2 * d + 2 * d * cfg.patch_dim)
  if cfg.variant == "tuna_r":
    # ViT over each image's patches (attention inside the image) and the connector.
    dv = cfg.vision_hidden_size
    vit_block = 2 * (4 * dv * dv + 2 * dv * cfg.vision_mlp_dim)
    flops += n_patch * (2 * cfg.patch_dim * dv + cfg.vision_kept_layers * vit_block + 2 * (dv * d + d * d))
    flops += cfg.vision_kept_layers * 4 * image_pairs(np.asarray(batch["image_ids"]), modality) * dv
  else:
    flops += 2 * n_patch * cfg.patch_dim * d                             # pixel embedding
  return float(flops)


def train_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray]) -> float:
  return 3.0 * forward_flops(cfg, batch)
