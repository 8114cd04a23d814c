"""tuna2_jax: pretrain Tuna-2, a native unified multimodal model (pixel embeddings, one decoder, a pixel-space
flow head), from a laptop CPU to TPU and GPU pods.

  model = tuna2_jax.from_pretrained("runs/tiny")      # a training workdir, a native export or an HF Qwen2 dir
  logits = model.text_logits(tokens)                  # int32 [B, L] -> float32 [B, L, vocab]
"""

from tuna2_jax.api import Pretrained, from_pretrained
from tuna2_jax.model.config import ConfigError, ModelConfig
from tuna2_jax.model.tuna2 import Tuna2, Tuna2Output
from tuna2_jax.sequence import Image, SpecialTokens, Text, pack_documents

__all__ = ["ConfigError", "Image", "ModelConfig", "Pretrained", "SpecialTokens", "Text", "Tuna2",
           "Tuna2Output", "from_pretrained", "pack_documents"]
