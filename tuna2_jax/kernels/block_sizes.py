"""Default flash-attention block sizes per kernel backend and accelerator generation.

Starting points from pallas.md §6.2 (none of them tuned on hardware by this project yet;
`benchmarks/attention.py` is the tool to retune): TPU blocks of 512 (128 is far too small on v5e, jax#24633;
levanter and splash default to 512), Pallas-Triton forward 128 x 64 and backward 64 x 64 (JAX's mha uses
128/128 forward and 32-wide backward blocks). `model.attention_block_q / attention_block_k` override the
forward (and backward) sizes.
"""

from __future__ import annotations

import dataclasses
import math

import jax

BACKENDS = ("mosaic_tpu", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int

  def lcm(self) -> int:
    return math.lcm(self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd)


# device_kind substring (lower case) -> (block_q, block_k); first match wins.
TPU_BLOCKS = (
    ("v4", (512, 512)),
    ("v5 lite", (512, 512)),   # v5e
    ("v5e", (512, 512)),
    ("v5", (512, 512)),        # v5p
    ("v6", (512, 1024)),       # Trillium: larger MXU-friendly k tiles
    ("tpu7", (512, 1024)),     # Ironwood (TPU7x)
)
TPU_DEFAULT = (512, 512)
TRITON_FWD = (128, 64)
TRITON_BWD = (64, 64)


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind.lower()
  except RuntimeError:
    return ""


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def default_block_sizes(backend: str, length: int, *, block_q: int | None = None,
                        block_k: int | None = None, device_kind: str | None = None) -> BlockSizes:
  """Block sizes for a row of `length` tokens; explicit block_q / block_k apply to forward and backward.

  Blocks never exceed the (rounded) row: a 300-token row gets one 384-wide TPU block or 512-wide Triton
  blocks rather than padding to the default 512 / 128 multiples more than needed.
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
  if backend == "mosaic_tpu":
    kind = _device_kind() if device_kind is None else device_kind.lower()
    bq, bk = next((b for key, b in TPU_BLOCKS if key in kind), TPU_DEFAULT)
    cap = _round_up(length, 128)          # Mosaic tiles: multiples of 128 along the sequence
    fwd = (min(block_q or bq, cap), min(block_k or bk, cap))
    bwd = fwd
    for b in fwd:
      if b % 128:
        raise ValueError(f"TPU attention blocks must be multiples of 128, got {fwd}")
  else:
    cap = max(16, _pow2_at_least(length))  # Triton: power-of-two tiles, >= 16 for tl.dot
    fwd = (min(block_q or TRITON_FWD[0], cap), min(block_k or TRITON_FWD[1], cap))
    bwd = (min(block_q or TRITON_BWD[0], cap), min(block_k or TRITON_BWD[1], cap))
    for b in fwd + bwd:
      if b & (b - 1) or b < 16:
        raise ValueError(f"Triton attention blocks must be powers of two >= 16, got {fwd}")
  return BlockSizes(fwd[0], fwd[1], bwd[0], bwd[1])
