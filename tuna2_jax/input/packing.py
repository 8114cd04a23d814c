"""Packing documents into rows of `seq_len` with Grain's first-fit / best-fit packers.

grain.experimental's packers fit the contract once each document is laid out on its own: they pack along the
first axis of every feature (so `patches` [n, p*p*3] and `positions` [n, 3] travel as well), give per-row
segment ids, keep their state for checkpointing and never split an element (a document longer than a row must
be dropped first, which the task templates guarantee). What they cannot know is that `attn_end` is an index
into the row and `image_ids` count images per row, so each document is laid out by `sequence.pack_documents`
with document-local values, and `FinalizeRow` shifts them once the row is known. The result is exactly what
`pack_documents` gives for the same documents in the same order.
"""

from __future__ import annotations

import grain
import numpy as np

from tuna2_jax.sequence import Document, SpecialTokens, document_length, pack_documents

# Per-document features the packer moves (segment_ids come from the packer).
DOC_FIELDS = ("tokens", "modality", "attn_end", "positions", "patches", "image_ids", "image_role",
              "text_loss")


def document_arrays(doc: Document, *, patch_size: int, special: SpecialTokens) -> dict[str, np.ndarray]:
  """One document laid out alone: the contract's fields with length-first axes, document-local indices."""
  n = document_length(doc, patch_size)
  row = pack_documents([doc], seq_len=n, patch_size=patch_size, special=special)
  row.pop("segment_ids")
  row["positions"] = np.ascontiguousarray(row["positions"].T)  # [n, 3]: the packer concatenates along axis 0
  return row


def pack(ds: grain.IterDataset, *, seq_len: int, special: SpecialTokens, method: str = "first_fit",
         num_bins: int = 16, seed: int = 0) -> grain.IterDataset:
  """Packs a dataset of `document_arrays` into rows of the contract (a `FinalizeRow` map included)."""
  lengths = {k: seq_len for k in DOC_FIELDS}
  padding = {k: 0 for k in DOC_FIELDS}
  padding["tokens"] = special.pad
  kinds = {"first_fit": grain.experimental.FirstFitPackIterDataset,
           "best_fit": grain.experimental.BestFitPackIterDataset}
  if method not in kinds:
    raise ValueError(f"data.packing={method!r}: expected one of {sorted(kinds)}")
  packed = kinds[method](ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=True,
                         padding_struct=padding)
  return packed.map(FinalizeRow())


class FinalizeRow(grain.transforms.Map):
  """Packer output -> a contract row: row-absolute attn_end, per-row image ids, positions [3, L]."""

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    seg = packed["tokens_segment_ids"].astype(np.int32)
    length = seg.shape[0]
    idx = np.arange(length, dtype=np.int32)
    local_pos = packed["positions"][:, 0]
    doc_start = idx - local_pos  # every document's positions[0] runs 0..n-1 from its first index
    attn_end = np.where(seg > 0, packed["attn_end"] + doc_start, idx).astype(np.int32)
    local_image = packed["image_ids"]
    image_ids = np.zeros(length, np.int32)
    has_image = local_image > 0
    if has_image.any():
      # Images numbered 1..k in row order: the packer numbers documents along the row and a document numbers
      # its images in order, so the rank of (document, local image id) is the row order.
      keys = seg[has_image].astype(np.int64) * (length + 1) + local_image[has_image]
      _, rank = np.unique(keys, return_inverse=True)
      image_ids[has_image] = rank + 1
    positions = np.where(seg[None, :] > 0, packed["positions"].T, 0).astype(np.int32)
    return dict(
        tokens=packed["tokens"].astype(np.int32), modality=packed["modality"].astype(np.int8),
        segment_ids=seg, attn_end=attn_end, positions=positions, patches=packed["patches"].astype(np.uint8),
        image_ids=image_ids, image_role=packed["image_role"].astype(np.int8),
        text_loss=packed["text_loss"].astype(np.float32))
