"""The packed-sequence contract: mask, positions, image spans, validation."""

import numpy as np
import pytest

from tests.helpers import random_row
from tuna2_jax import sequence as S

P = 4


def brute_force_mask(docs, seq_len, patch_size):
  """The DESIGN.md rule from the document structure alone: causal text, bidirectional TIME + patches,
  nothing across documents, padding sees nothing."""
  owner = np.zeros(seq_len, int)         # document id per position (0 = pad)
  span = np.full(seq_len, -1)            # image span id for TIME + patches
  cursor, n_span = 0, 0
  for d, doc in enumerate(docs, start=1):
    for part in doc:
      if isinstance(part, S.Text):
        owner[cursor:cursor + len(part.ids)] = d
        cursor += len(part.ids)
      else:
        n = S.image_span_length(*part.pixels.shape[:2], patch_size)
        owner[cursor:cursor + n] = d
        span[cursor + 1:cursor + n - 1] = n_span
        n_span += 1
        cursor += n
  mask = np.zeros((seq_len, seq_len), bool)
  for q in range(seq_len):
    for k in range(seq_len):
      if owner[q] == 0 or owner[q] != owner[k]:
        continue
      mask[q, k] = k <= q or (span[q] >= 0 and span[q] == span[k])
  return mask


@pytest.mark.parametrize("seed", range(6))
def test_mask_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  from tests.helpers import random_document
  docs, used = [], 0
  while True:
    doc = random_document(rng, patch_size=P, vocab=50, max_grid=3)
    n = S.document_length(doc, P)
    if used + n > 96:
      break
    docs.append(doc)
    used += n
  row = S.pack_documents(docs, seq_len=100, patch_size=P)
  np.testing.assert_array_equal(S.dense_mask(row["segment_ids"], row["attn_end"]),
                                brute_force_mask(docs, 100, P))


def test_image_span_layout():
  special = S.SpecialTokens()
  for h, w in [(4, 4), (8, 12), (12, 4), (16, 16)]:
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    row = S.pack_documents([[S.Text([10, 11]), S.Image(img), S.Text([12])]], seq_len=128, patch_size=P)
    n = (h // P) * (w // P)
    assert row["tokens"][2] == special.boi and row["tokens"][4 + n] == special.eoi
    assert row["modality"][3] == S.TIME and (row["modality"][4:4 + n] == S.PATCH).all()
    assert (row["attn_end"][3:4 + n] == 3 + n).all()                        # span sees itself whole
    assert row["attn_end"][2] == 2 and row["attn_end"][4 + n] == 4 + n       # BOI, EOI causal
    assert (row["image_ids"][3:4 + n] == 1).all() and row["image_ids"][2] == 0
    grid_r, grid_c = np.divmod(np.arange(n), w // P)
    np.testing.assert_array_equal(row["positions"][1, 4:4 + n], grid_r)
    np.testing.assert_array_equal(row["positions"][2, 4:4 + n], grid_c)
    np.testing.assert_array_equal(S.unpatchify(row["patches"][4:4 + n], (h // P, w // P), P), img)


def test_patchify_roundtrip_and_raster_order():
  img = np.arange(8 * 12 * 3, dtype=np.int64).reshape(8, 12, 3)
  patches = S.patchify(img, 4)
  assert patches.shape == (6, 48)
  np.testing.assert_array_equal(patches[4].reshape(4, 4, 3), img[4:8, 4:8])   # patch (1, 1)
  np.testing.assert_array_equal(S.unpatchify(patches, (2, 3), 4), img)


def test_positions_restart_per_document_and_padding():
  row = random_row(np.random.default_rng(3), seq_len=128, patch_size=P, vocab=50)
  seg = row["segment_ids"]
  for s in np.unique(seg[seg > 0]):
    idx = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(row["positions"][0, idx], np.arange(len(idx)))
  assert (row["positions"][:, seg == 0] == 0).all()


def mrope_reference(row):
  """Qwen2-VL get_rope_index, re-derived per document with a Python loop over the contract's spans."""
  length = len(row["tokens"])
  out = np.zeros((3, length), int)
  i = 0
  while i < length:
    if row["segment_ids"][i] == 0:
      i += 1
      continue
    if row["positions"][0, i] == 0:
      nxt = 0
    if row["modality"][i] == S.PATCH:
      last = row["attn_end"][i]
      rows, cols = row["positions"][1, i:last + 1], row["positions"][2, i:last + 1]
      out[0, i:last + 1], out[1, i:last + 1], out[2, i:last + 1] = nxt, nxt + rows, nxt + cols
      nxt += max(rows.max(), cols.max()) + 1
      i = last + 1
      continue
    out[:, i] = nxt
    nxt += 1
    i += 1
  return out


@pytest.mark.parametrize("seed", range(4))
def test_mrope_positions_match_reference(seed):
  row = random_row(np.random.default_rng(seed), seq_len=160, patch_size=P, vocab=50)
  np.testing.assert_array_equal(S.mrope_positions(row["positions"], row["attn_end"], row["modality"]),
                                mrope_reference(row))
  batch = S.stack_rows([row, row])
  import jax.numpy as jnp
  got = S.mrope_positions(jnp.asarray(batch["positions"]), jnp.asarray(batch["attn_end"]),
                          jnp.asarray(batch["modality"]))
  np.testing.assert_array_equal(np.asarray(got[1]), mrope_reference(row))


def test_mrope_reduces_to_1d_for_text():
  batch = S.text_batch(np.arange(20).reshape(2, 10), P)
  mrope = S.mrope_positions(batch["positions"], batch["attn_end"], batch["modality"])
  for axis in range(3):
    np.testing.assert_array_equal(mrope[:, axis], batch["positions"][:, 0])


def test_text_loss_targets_trained_text_in_same_document():
  docs = [[S.Text([7, 8, 9]), S.Image(np.zeros((4, 4, 3), np.uint8)), S.Text([10, 11], loss=False)],
          [S.Text([3, 4])]]
  row = S.pack_documents(docs, seq_len=16, patch_size=P)
  # Layout: 7 8 9 BOI TIME P EOI 10 11 | 3 4 | pad. Loss at i predicts token i + 1.
  expected = np.zeros(16)
  expected[[0, 1, 9]] = 1.0
  np.testing.assert_array_equal(row["text_loss"], expected)


@pytest.mark.parametrize("docs, message", [
    ([[]], "empty document"),
    ([[S.Image(np.zeros((6, 8, 3), np.uint8))]], "not a positive multiple of the patch size 4"),
    ([[S.Image(np.zeros((4, 4, 3), np.float32))]], "must be uint8"),
    ([[S.Image(np.zeros((4, 4, 3), np.uint8), "generate"), S.Text([1])]],
     "generation target must be the last"),
    ([[S.Text(np.arange(30))]], "do not fit"),
    ([[S.Text([])]], "empty text part"),
])
def test_validation_errors_name_the_problem(docs, message):
  with pytest.raises(S.SequenceError, match=message):
    S.pack_documents(docs, seq_len=20, patch_size=P)


def test_validate_row_accepts_packed_rows():
  for seed in range(5):
    row = random_row(np.random.default_rng(seed), seq_len=128, patch_size=P, vocab=50)
    S.validate_row(row, patch_size=P, special=S.SpecialTokens())


def _break(row, field, index, value):
  row = {k: v.copy() for k, v in row.items()}
  row[field][index] = value
  return row


def test_validate_row_rejects_each_broken_rule():
  docs = [[S.Text([7, 8]), S.Image(np.full((4, 8, 3), 9, np.uint8)), S.Text([9])],
          [S.Text([3]), S.Image(np.zeros((4, 4, 3), np.uint8), "generate")]]
  row = S.pack_documents(docs, seq_len=20, patch_size=P)
  # 7 8 BOI TIME P P EOI 9 | 3 BOI TIME P EOI | pad
  S.validate_row(row, patch_size=P)
  cases = [
      (_break(row, "attn_end", 1, 3), "text positions are causal"),
      (_break(row, "attn_end", 4, 4), "bidirectional inside"),
      (_break(row, "segment_ids", 18, 1), "padding"),
      (_break(row, "patches", 0, 1), "pixels only at patch positions"),
      (_break(row, "image_role", 4, S.GENERATE), "one role"),
      (_break(row, "text_loss", 17, 1.0), "no loss on padding"),
      (_break(row, "text_loss", 2, 1.0), "next token is text"),
      (_break(row, "positions", (0, 9), 3), "positions"),
      ({**row, "tokens": row["tokens"].astype(np.int64)}, "dtype"),
  ]
  for broken, message in cases:
    with pytest.raises(S.SequenceError, match=message):
      S.validate_row(broken, patch_size=P)
