"""Shared test fixtures: random packed layouts and random batches of the contract."""

from __future__ import annotations

import numpy as np

from tuna2_jax import sequence


def random_document(rng: np.random.Generator, *, patch_size: int, vocab: int, max_text: int = 12,
                    max_grid: int = 3, allow_generate: bool = True) -> list:
  """1-3 text parts interleaved with 0-2 images of random sizes; maybe a generation target at the end."""
  parts: list = [sequence.Text(rng.integers(6, vocab, rng.integers(1, max_text)))]
  for _ in range(rng.integers(0, 3)):
    h, w = rng.integers(1, max_grid + 1, 2) * patch_size
    parts.append(sequence.Image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "understand"))
    parts.append(sequence.Text(rng.integers(6, vocab, rng.integers(1, max_text)), loss=bool(rng.integers(2))))
  if allow_generate and rng.random() < 0.4:
    h, w = rng.integers(1, max_grid + 1, 2) * patch_size
    parts.append(sequence.Image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "generate"))
  return parts


def random_row(rng: np.random.Generator, *, seq_len: int, patch_size: int, vocab: int, max_docs: int = 4,
               **kw) -> dict[str, np.ndarray]:
  """Packs random documents until the next one would not fit (at least one document)."""
  docs, used = [], 0
  for _ in range(max_docs):
    doc = random_document(rng, patch_size=patch_size, vocab=vocab, **kw)
    n = sequence.document_length(doc, patch_size)
    if used + n > seq_len:
      break
    docs.append(doc)
    used += n
  if not docs:
    docs = [[sequence.Text(rng.integers(6, vocab, min(seq_len, 8)))]]
  return sequence.pack_documents(docs, seq_len=seq_len, patch_size=patch_size)


def random_batch(seed: int, *, batch_size: int, seq_len: int, patch_size: int, vocab: int, **kw):
  rng = np.random.default_rng(seed)
  return sequence.stack_rows([random_row(rng, seq_len=seq_len, patch_size=patch_size, vocab=vocab, **kw)
                              for _ in range(batch_size)])
