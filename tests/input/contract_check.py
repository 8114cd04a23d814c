"""An independent checker of the packed-sequence contract (DESIGN.md), used by the input tests."""

import numpy as np

from tuna2_jax import sequence as seq


def check_row(row: dict, *, seq_len: int, patch_size: int, special: seq.SpecialTokens) -> None:
  """Asserts every rule of the contract on one row (no batch axis), then runs the library's validator."""
  seq.validate_row(row, patch_size=patch_size, special=special)
  shapes = dict(tokens=(seq_len,), modality=(seq_len,), segment_ids=(seq_len,), attn_end=(seq_len,),
                positions=(3, seq_len), patches=(seq_len, patch_size * patch_size * 3), image_ids=(seq_len,),
                image_role=(seq_len,), text_loss=(seq_len,))
  dtypes = dict(tokens=np.int32, modality=np.int8, segment_ids=np.int32, attn_end=np.int32,
                positions=np.int32, patches=np.uint8, image_ids=np.int32, image_role=np.int8,
                text_loss=np.float32)
  assert set(row) == set(seq.FIELDS), sorted(row)
  for k in seq.FIELDS:
    assert row[k].shape == shapes[k] and row[k].dtype == dtypes[k], (k, row[k].shape, row[k].dtype)
  seg, mod, end, pos = row["segment_ids"], row["modality"], row["attn_end"], row["positions"]
  idx = np.arange(seq_len)
  pad = seg == 0
  assert np.array_equal(pad, mod == seq.PAD)
  n_real = int((~pad).sum())
  assert not pad[:n_real].any(), "padding only at the end of the row"
  assert (np.diff(seg[:n_real]) >= 0).all(), "documents are contiguous"
  assert (row["tokens"][pad] == special.pad).all() and (row["text_loss"][pad] == 0).all()
  assert (row["patches"][mod != seq.PATCH] == 0).all()
  assert (end >= idx).all() and (end < seq_len).all()
  assert (seg[end] == seg).all(), "attn_end stays inside the segment"
  text = mod == seq.TEXT
  assert (end[text] == idx[text]).all(), "text is causal"
  for s in np.unique(seg[~pad]):
    where = np.flatnonzero(seg == s)
    assert np.array_equal(pos[0, where], np.arange(len(where))), "1-D positions restart per document"
  # Image spans: [BOI] [TIME] patches [EOI], bidirectional inside, ids 1..k in row order.
  ids = [i for i in np.unique(row["image_ids"]) if i > 0]
  assert ids == list(range(1, len(ids) + 1))
  for i in ids:
    where = np.flatnonzero(row["image_ids"] == i)
    t, last = where[0], where[-1]
    assert np.array_equal(where, np.arange(t, last + 1)), "an image is contiguous"
    assert mod[t] == seq.TIME and (mod[t + 1:last + 1] == seq.PATCH).all() and last > t
    assert row["tokens"][t - 1] == special.boi and row["tokens"][last + 1] == special.eoi
    assert mod[t - 1] == seq.TEXT and mod[last + 1] == seq.TEXT
    assert (end[where] == last).all()
    assert len(set(row["image_role"][where])) == 1 and row["image_role"][t] in (seq.UNDERSTAND, seq.GENERATE)
    rows_, cols = pos[1, t + 1:last + 1], pos[2, t + 1:last + 1]
    gh, gw = rows_.max() + 1, cols.max() + 1
    assert gh * gw == last - t
    assert np.array_equal(rows_ * gw + cols, np.arange(gh * gw)), "patches in raster order"
    if row["image_role"][t] == seq.GENERATE:
      after = last + 2
      assert after == seq_len or seg[after] != seg[t], "a generation target is last in its document"
  assert (row["image_role"][row["image_ids"] == 0] == 0).all()
  loss = row["text_loss"]
  assert set(np.unique(loss)) <= {0.0, 1.0}
  li = np.flatnonzero(loss)
  assert (li < seq_len - 1).all() and (seg[li] == seg[li + 1]).all() and (mod[li + 1] == seq.TEXT).all()
  # The dense mask of the contract: only inside a document, causal outside image spans.
  mask = seq.dense_mask(seg, end)
  same = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
  assert not (mask & ~same).any()
  assert (mask.diagonal() == ~pad).all()


def check_batch(batch: dict, *, batch_size: int, seq_len: int, patch_size: int,
                special: seq.SpecialTokens) -> None:
  for k, v in batch.items():
    assert v.shape[0] == batch_size, (k, v.shape)
  for b in range(batch_size):
    check_row({k: v[b] for k, v in batch.items()}, seq_len=seq_len, patch_size=patch_size, special=special)
