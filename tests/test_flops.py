"""The MFU FLOP count: a hand count for a small config, the mask's pair count vs the dense mask."""

import numpy as np
import pytest

from tests.helpers import random_batch
from tuna2_jax import flops, sequence
from tuna2_jax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                  mlp_dim=16, patch_size=2, time_embed_dim=4, flow_layers=1, flow_heads=2, flow_kv_heads=1,
                  flow_head_dim=4, flow_mlp_dim=16)


def test_flops_match_a_hand_count():
  # t t BOI TIME P P EOI pad: 7 tokens, one 1x2-patch understanding image.
  row = sequence.pack_documents([[sequence.Text([7, 8]), sequence.Image(np.zeros((2, 4, 3), np.uint8))]],
                                seq_len=8, patch_size=2)
  batch = sequence.stack_rows([row])
  pairs = 1 + 2 + 3 + 6 + 6 + 6 + 7            # keys per query: causal text, the span sees itself whole
  decoder_macs = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16   # q, k, v, o, SwiGLU
  expected = (
      7 * 2 * decoder_macs                      # decoder projections and MLP
      + 2 * 2 * pairs * 2 * 4                   # QK^T and PV: 2 heads of dim 4
      + 2 * 7 * 8 * 10                          # LM head
      + 2 * (4 * 8 + 8 * 8)                     # TIME slot MLP
      + 2 * 2 * 12 * 8                          # two patches through the pixel embedding
      + 7 * (2 * decoder_macs + 2 * 8 * 48)     # flow block: same shapes plus adaLN (6 D)
      + 2 * 2 * pairs * 2 * 4                   # flow attention
      + 7 * (2 * 8 * 16 + 2 * 8 * 12))          # final adaLN (2 D) and the pixel projection
  assert flops.forward_flops(CFG, batch) == expected
  assert flops.train_flops(CFG, batch) == 3 * expected


@pytest.mark.parametrize("seed", range(3))
def test_allowed_pairs_equal_the_dense_mask(seed):
  batch = random_batch(seed, batch_size=3, seq_len=80, patch_size=4, vocab=50)
  dense = sequence.dense_mask(batch["segment_ids"], batch["attn_end"]).sum()
  assert flops.allowed_pairs(batch["segment_ids"], batch["attn_end"], batch["positions"]) == dense


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("cpu") is None
