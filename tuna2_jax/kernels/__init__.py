"""Attention kernels for the contract's hybrid mask: Pallas flash (TPU / GPU), ring, and their dispatch."""

from tuna2_jax.kernels.flash import hybrid_attention
from tuna2_jax.kernels.ring import ring_attention

__all__ = ["hybrid_attention", "ring_attention"]
