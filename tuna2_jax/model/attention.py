"""GQA self-attention with q/k/v bias (Qwen2) and the attention-backend dispatch.

Every backend takes exactly the contract's mask, (segment_ids, attn_end); no L x L array leaves a backend.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from tuna2_jax.kernels import dispatch
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.layers import apply_rope, constrain, dense


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array, attn_end: jax.Array,
           cfg: ModelConfig) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v under the hybrid mask; q [B, L, Hq, D], k/v [B, L, Hkv, D].

  The backend is `model.attention` ("auto" | "xla" | "chunked" | "pallas" | "cudnn" | "ring", with its chunk
  and block sizes); the choice per platform and mesh, and any fallback with its reason, is made and logged
  by `kernels.dispatch`.
  """
  return dispatch.attention(q, k, v, segment_ids=segment_ids, attn_end=attn_end, impl=cfg.attention,
                            chunk=cfg.attention_chunk, block_q=cfg.attention_block_q or None,
                            block_k=cfg.attention_block_k or None)


class Attention(nn.Module):
  """Qwen2 attention: biased q/k/v projections, RoPE, GQA, unbiased output projection."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array,
               attn_end: jax.Array) -> jax.Array:
    cfg = self.cfg
    q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="q")(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="k")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg=cfg,
              use_bias=cfg.qkv_bias, name="v")(x)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    out = attend(q, k, v, segment_ids=segment_ids, attn_end=attn_end, cfg=cfg)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return dense(x.shape[-1], ("heads", "head_dim", "embed"), cfg=cfg, axis=(-2, -1), name="o")(out)
