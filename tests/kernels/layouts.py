"""Random packed rows of the contract (segment_ids, attn_end) for the kernel tests and the benchmark."""

from __future__ import annotations

import numpy as np


def random_row(rng: np.random.Generator, length: int, *, max_docs: int = 4, image_p: float = 0.5,
               max_span: int = 40, min_used: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """One row: 1..max_docs documents of text runs and image spans (lengths 1..max_span), ragged padding."""
  seg = np.zeros(length, np.int32)
  end = np.arange(length, dtype=np.int32)
  used = int(rng.integers(max(1, int(length * min_used)), length + 1))
  n_cuts = int(rng.integers(0, max_docs))
  cuts = np.sort(rng.choice(np.arange(1, used), min(n_cuts, used - 1), replace=False)) if used > 1 else []
  bounds = [0, *[int(c) for c in cuts], used]
  for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=False)):
    seg[s:e] = d + 1
    p = s
    while p < e:
      span = int(rng.integers(1, max_span + 1))
      stop = min(e, p + span)
      if rng.random() < image_p:
        end[p:stop] = stop - 1       # bidirectional image span, causal to the past
      p = stop
  return seg, end


def random_layout(rng: np.random.Generator, batch: int, length: int, **kw) -> tuple[np.ndarray, np.ndarray]:
  rows = [random_row(rng, length, **kw) for _ in range(batch)]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def dense_mask(seg: np.ndarray, end: np.ndarray) -> np.ndarray:
  """[B, L, L] bool, the contract's rule."""
  k = np.arange(seg.shape[-1])
  return (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (k[None, None, :] <= end[:, :, None])
