"""Packing with grain's packers + FinalizeRow reproduces sequence.pack_documents and the contract."""

import grain
import numpy as np
import pytest
from contract_check import check_row

from tuna2_jax import sequence as seq
from tuna2_jax.input import images, packing

P = 4
SPECIAL = seq.SpecialTokens()


def random_docs(n: int, seed: int = 0) -> list:
  """Documents whose first token (1000 + i) names them; mixes text, understanding, generation and editing."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    def text(k):
      return seq.Text(rng.integers(10, 500, k).tolist(), loss=bool(rng.random() < 0.7))

    def img(role):
      h, w = rng.integers(1, 4, 2) * P
      return seq.Image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), role)

    head = seq.Text([1000 + i], loss=False)
    kind = i % 4
    if kind == 0:
      doc = [head, text(int(rng.integers(1, 30)))]
    elif kind == 1:
      doc = [head, img("understand"), text(int(rng.integers(1, 10))), text(int(rng.integers(1, 10)))]
    elif kind == 2:
      doc = [head, text(int(rng.integers(1, 10))), img("generate")]
    else:
      doc = [head, img("understand"), text(3), img("generate")]
    docs.append(doc)
  return docs


def doc_id(doc) -> int:
  return int(doc[0].ids[0]) - 1000


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packed_rows_equal_pack_documents(method):
  seq_len, docs = 64, random_docs(60)
  arrays = [packing.document_arrays(d, patch_size=P, special=SPECIAL) for d in docs]
  ds = grain.MapDataset.source(arrays).to_iter_dataset()
  rows = list(packing.pack(ds, seq_len=seq_len, special=SPECIAL, method=method, num_bins=4))
  seen = []
  for row in rows:
    check_row(row, seq_len=seq_len, patch_size=P, special=SPECIAL)
    # Which documents went into this row, in row order: their first token names them.
    starts = np.flatnonzero((row["positions"][0] == 0) & (row["segment_ids"] > 0))
    ids = [int(row["tokens"][s]) - 1000 for s in starts]
    seen += ids
    expected = seq.pack_documents([docs[i] for i in ids], seq_len=seq_len, patch_size=P, special=SPECIAL)
    for k in seq.FIELDS:
      np.testing.assert_array_equal(row[k], expected[k], err_msg=k)
  assert sorted(seen) == list(range(len(docs))), "every document exactly once"


def test_pack_rejects_unknown_method():
  with pytest.raises(ValueError, match="data.packing"):
    packing.pack(grain.MapDataset.source([]).to_iter_dataset(), seq_len=8, special=SPECIAL, method="nope")


def test_fit_grid_rule():
  assert images.fit_grid(64, 128, 8, 1000) == (8, 16)  # fits: unchanged
  assert images.fit_grid(64, 128, 8, 32) == (4, 8)  # halved, aspect kept
  gh, gw = images.fit_grid(100, 37, 8, 10)
  assert gh * gw <= 10 and gh > gw
  assert images.fit_grid(4, 4, 8, 10) == (1, 1)  # tiny images grow to one patch
  out = images.fit_image(np.zeros((70, 130, 3), np.uint8), patch_size=8, max_patches=64)
  assert out.shape[0] % 8 == 0 and out.shape[1] % 8 == 0 and (out.shape[0] // 8) * (out.shape[1] // 8) <= 64


def test_buckets():
  grids = images.bucket_grids(1024 // 4, (1.0, 7 / 9, 9 / 7))
  assert all(gh * gw <= 256 for gh, gw in grids)
  out = images.fit_image(np.zeros((60, 120, 3), np.uint8), patch_size=8, max_patches=256, mode="buckets",
                         aspects=(1.0, 0.5, 2.0))
  gh, gw = images.bucket_grids(256, (0.5,))[0]
  assert out.shape[:2] == (gh * 8, gw * 8)
  with pytest.raises(ValueError, match="image_mode"):
    images.fit_image(out, patch_size=8, max_patches=4, mode="bogus")
