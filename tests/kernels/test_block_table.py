"""Block table exactness: EMPTY / FULL / PARTIAL per tile equal the dense mask's none / all / some.

Seeded NumPy layouts and hand-made edge rows first, then hypothesis properties: packed rows built from drawn
documents (text runs and image spans, trailing padding) are classified exactly, in the forward table and in
the transposed one the dK/dV kernels use, against a brute-force tile loop over the contract's rule; arbitrary
(non-packed) inputs are classified soundly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, find, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.kernels.layouts import dense_mask, random_layout
from tuna2_jax.kernels import block_table as bt

_kinds = jax.jit(lambda seg, end, bq, bk: bt.block_kinds(bt.token_stats(seg, end), bq, bk),
                 static_argnums=(2, 3))


def _exact(seg, end, bq, bk):
  b, l = seg.shape
  m = dense_mask(seg, end).reshape(b, l // bq, bq, l // bk, bk)
  return np.where(~m.any((2, 4)), bt.EMPTY, np.where(m.all((2, 4)), bt.FULL, bt.PARTIAL))


def _edge_rows(l):
  """Hand-made rows: all text (causal), all image (bidirectional), one-token segments, an image longer than
  a block and crossing block boundaries, all padding, image at a segment's start and end."""
  ar = np.arange(l, dtype=np.int32)
  rows = []
  rows.append((np.ones(l, np.int32), ar.copy()))                                      # causal
  rows.append((np.ones(l, np.int32), np.full(l, l - 1, np.int32)))                    # bidirectional
  rows.append((ar + 1, ar.copy()))                                                     # one-token segments
  seg, end = np.ones(l, np.int32), ar.copy()
  end[5:5 + 3 * l // 4] = 5 + 3 * l // 4 - 1                                          # long image
  rows.append((seg, end))
  rows.append((np.zeros(l, np.int32), ar.copy()))                                      # all padding
  seg = np.where(ar < l // 2, 1, 2).astype(np.int32)
  end = ar.copy()
  end[: l // 8] = l // 8 - 1                                                           # image at doc start
  end[l // 2 - l // 8: l // 2] = l // 2 - 1                                            # image at doc end
  seg[-3:] = 0
  rows.append((seg, end))
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@pytest.mark.parametrize("bq,bk", [(16, 16), (16, 32), (32, 8), (64, 64)])
def test_random_layouts_exact(bq, bk):
  rng = np.random.default_rng(bq * 100 + bk)
  for length in (64, 128):
    for kw in (dict(), dict(max_span=3, max_docs=12), dict(image_p=0.9, max_span=70), dict(min_used=0.05)):
      seg, end = random_layout(rng, 8, length, **kw)
      got = np.asarray(_kinds(jnp.asarray(seg), jnp.asarray(end), bq, bk))
      np.testing.assert_array_equal(got, _exact(seg, end, bq, bk), err_msg=f"L={length} {kw}")


@pytest.mark.parametrize("bq,bk", [(16, 16), (8, 32), (64, 64)])
def test_edge_rows_exact(bq, bk):
  seg, end = _edge_rows(64)      # bq = bk = 64: the whole row is one block
  got = np.asarray(_kinds(jnp.asarray(seg), jnp.asarray(end), bq, bk))
  np.testing.assert_array_equal(got, _exact(seg, end, bq, bk))


def test_sound_for_reused_segment_ids():
  """A segment id that reappears later in the row: never claims EMPTY for a tile with an allowed pair."""
  rng = np.random.default_rng(0)
  seg = rng.integers(0, 3, size=(4, 64)).astype(np.int32)
  end = np.maximum(np.arange(64), rng.integers(0, 64, size=(4, 64))).astype(np.int32)
  got = np.asarray(_kinds(jnp.asarray(seg), jnp.asarray(end), 16, 16))
  exact = _exact(seg, end, 16, 16)
  assert not ((got == bt.EMPTY) & (exact != bt.EMPTY)).any()
  assert not ((got == bt.FULL) & (exact != bt.FULL)).any()


def test_ranges_and_compact_cover_the_table():
  rng = np.random.default_rng(3)
  seg, end = random_layout(rng, 6, 128)
  kind = _kinds(jnp.asarray(seg), jnp.asarray(end), 16, 32)
  for table in (kind, jnp.swapaxes(kind, 1, 2)):
    k = np.asarray(table)
    r = bt.ranges(table)
    c = bt.compact(table)
    n = k.shape[-1]
    j = np.arange(n)
    lo, flo, fhi, hi = (np.asarray(x)[..., None] for x in (r.lo, r.full_lo, r.full_hi, r.hi))
    assert ((k == bt.EMPTY) | ((j >= lo) & (j < hi))).all()              # every non-empty block is looped
    assert (k[(j >= flo) & (j < fhi)] == bt.FULL).all()                  # the unmasked loop runs full only
    idx, kinds = np.asarray(c.index), np.asarray(c.kind)
    count = (k != bt.EMPTY).sum(-1)
    assert int(c.steps[0]) == max(1, count.max())
    for b in range(k.shape[0]):
      for i in range(k.shape[1]):
        nz = np.flatnonzero(k[b, i] != bt.EMPTY)
        np.testing.assert_array_equal(idx[b, i, :len(nz)], nz)
        np.testing.assert_array_equal(kinds[b, i, :len(nz)], k[b, i, nz])
        assert (kinds[b, i, len(nz):] == bt.EMPTY).all()
        if len(nz):
          assert (idx[b, i, len(nz):] == nz[-1]).all()                   # repeated index: no new DMA


def test_executed_fraction_sums_to_one():
  seg, end = _edge_rows(64)
  frac = bt.executed_fraction(_kinds(jnp.asarray(seg), jnp.asarray(end), 16, 16))
  assert abs(sum(frac.values()) - 1) < 1e-9


# ------------------------------------------------------------------------------------ hypothesis properties
# Rows are drawn at a few fixed lengths (one jit compile per (length, block pair), a handful in all) with a
# drawn used length: a contract row of any length, padded at the end with segment 0 as flash.py pads it to the
# block multiple (and further: more all-padding blocks, which must come out EMPTY).
_SHORT, _LONG = 32, 96
# A dozen (length, block pair) shapes: equal, nested both ways, and 24 against 16 / 32, blocks that straddle
# each other's boundaries (as TPU 384 against 512 would).
_PAIRS = {_SHORT: [(32, 32), (8, 32)],
          _LONG: [(8, 8), (16, 16), (32, 32), (8, 32), (32, 8), (16, 32), (32, 16),
                  (24, 32), (32, 24), (16, 24)]}
_BATCH = 3
_PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])

TEXT, IMAGE = "text", "image"


def _pack(docs, length: int, used: int | None = None, pad_end: str = "arange"):
  """One row from documents, each a list of (TEXT | IMAGE, n) spans, packed in order from position 0.

  Text runs are causal (attn_end = i), image spans bidirectional (attn_end = the span's last index), each
  document gets the next segment id. Spans are cut at `used` (default: the whole row); the rest is padding
  (segment 0) whose attn_end is `pad_end`: "arange" (sequence.empty_row), "zero" (flash.py's jnp.pad) or
  "last" (L - 1); the rule ignores it either way.
  """
  used = length if used is None else used
  seg = np.zeros(length, np.int32)
  end = dict(arange=np.arange(length), zero=np.zeros(length), last=np.full(length, length - 1))[pad_end]
  end = end.astype(np.int32)
  p = 0
  for d, doc in enumerate(docs, start=1):
    for kind, n in doc:
      n = min(n, used - p)
      if n <= 0:
        break
      seg[p:p + n] = d
      end[p:p + n] = np.arange(p, p + n) if kind == TEXT else p + n - 1
      p += n
  return seg, end


def _batch(*rows):
  seg, end = zip(*rows)
  return np.stack(seg), np.stack(end)


def _spans(length: int):
  span_len = st.one_of(st.integers(1, 12), st.integers(1, length), st.just(length))   # 1 token .. whole row
  return st.tuples(st.sampled_from((TEXT, IMAGE)), span_len)


@st.composite
def _rows(draw, length: int):
  docs = draw(st.lists(st.lists(_spans(length), min_size=1, max_size=6), min_size=0, max_size=8))
  used = draw(st.one_of(st.just(length), st.integers(0, length)))
  return _pack(docs, length, used, draw(st.sampled_from(("arange", "zero", "last"))))


@st.composite
def _cases(draw):
  """(bq, bk, seg [B, L], end [B, L]) of packed rows."""
  length = draw(st.sampled_from((_SHORT, _LONG)))
  bq, bk = draw(st.sampled_from(_PAIRS[length]))
  return (bq, bk, *_batch(*(draw(_rows(length)) for _ in range(_BATCH))))


def _brute_kinds(seg, end, bq, bk, transposed=False):
  """Tile by tile straight from the rule allowed(q, k) = seg[q] == seg[k] != 0 and k <= attn_end[q].

  transposed: the dK/dV table, [B, n_k, n_q], rows = k blocks.
  """
  b, l = seg.shape
  nq, nk = l // bq, l // bk
  out = np.zeros((b, nk, nq) if transposed else (b, nq, nk), np.int32)
  for r in range(b):
    for i in range(nq):
      q = np.arange(i * bq, (i + 1) * bq)[:, None]
      for j in range(nk):
        k = np.arange(j * bk, (j + 1) * bk)[None, :]
        ok = (seg[r, q] == seg[r, k]) & (seg[r, q] != 0) & (k <= end[r, q])
        kind = bt.FULL if ok.all() else bt.PARTIAL if ok.any() else bt.EMPTY
        out[(r, j, i) if transposed else (r, i, j)] = kind
  return out


def _edge_cases():
  """Named layouts the property must hold on, whatever hypothesis draws."""
  l = _LONG
  all_text = _pack([[(TEXT, l)]], l)
  all_image = _pack([[(IMAGE, l)]], l)
  one_token_text = _pack([[(TEXT, 1)]] * l, l)
  one_token_image = _pack([[(IMAGE, 1)]] * l, l)
  tiny_docs = [[(TEXT, 1)], [(IMAGE, 1)], [(TEXT, 2), (IMAGE, 1)], [(IMAGE, 1), (TEXT, 1)]] * 8
  one_token_mixed = _pack(tiny_docs, l, used=l - 5, pad_end="zero")
  crossing = _pack([[(TEXT, 5), (IMAGE, 20), (TEXT, 3), (IMAGE, 9)], [(IMAGE, 7), (TEXT, 30)]], l, used=77)
  longer = _pack([[(TEXT, 3), (IMAGE, 40), (TEXT, 2)], [(IMAGE, 33), (IMAGE, 1), (TEXT, 4)]], l, used=90)
  image_docs = _pack([[(IMAGE, 17)], [(IMAGE, 40)], [(IMAGE, 30)]], l, pad_end="last")   # 9 padding tokens
  all_pad = _pack([], l)
  rows = (all_text, all_image, one_token_text, one_token_image, one_token_mixed, crossing, longer, image_docs,
          all_pad)
  cases = []
  for bq, bk in ((16, 16), (8, 32), (32, 8), (24, 32), (32, 24)):
    for i in range(0, len(rows), _BATCH):
      cases.append((bq, bk, *_batch(*rows[i:i + _BATCH])))
  return cases


def _with_examples(test):
  for case in _edge_cases():
    test = example(case=case)(test)
  return test


def test_block_kinds_requires_block_multiples():
  """The table itself takes L % block == 0 only; callers pad (flash.py: segment 0 up to the blocks' lcm)."""
  seg = np.ones((1, 40), np.int32)
  stats = bt.TokenStats(seg, np.arange(40, dtype=np.int32)[None], np.zeros_like(seg))
  with pytest.raises(ValueError, match="not a multiple"):
    bt.block_kinds(stats, 16, 8)
  with pytest.raises(ValueError, match="not a multiple"):
    bt.block_kinds(stats, 8, 16)


@settings(_PROPERTY)
@_with_examples
@given(case=_cases())
def test_property_packed_rows_exact(case):
  """Forward table and transposed (dK/dV) table equal the brute-force classification, tile for tile."""
  bq, bk, seg, end = case
  got = np.asarray(_kinds(jnp.asarray(seg), jnp.asarray(end), bq, bk))
  np.testing.assert_array_equal(got, _brute_kinds(seg, end, bq, bk))
  np.testing.assert_array_equal(np.swapaxes(got, 1, 2), _brute_kinds(seg, end, bq, bk, transposed=True))
  # ranges()'s unmasked middle relies on packed rows having their FULL blocks contiguous, in both tables.
  for table in (got, np.swapaxes(got, 1, 2)):
    for row in table.reshape(-1, table.shape[-1]):
      full = np.flatnonzero(row == bt.FULL)
      assert len(full) == 0 or full[-1] - full[0] + 1 == len(full), row


@st.composite
def _arbitrary(draw):
  """Any segment ids (reused, interleaved, zero anywhere) and any attn_end in [0, L): not a packed row."""
  length = _LONG
  bq, bk = draw(st.sampled_from(_PAIRS[length]))
  seg = draw(hnp.arrays(np.int32, (_BATCH, length), elements=st.integers(0, 3)))
  end = draw(hnp.arrays(np.int32, (_BATCH, length), elements=st.integers(0, length - 1)))
  return bq, bk, seg, end


@settings(_PROPERTY, max_examples=100)
@given(case=_arbitrary())
def test_property_sound_for_any_input(case):
  """Never EMPTY where a pair is allowed, never FULL where one is not (PARTIAL is always safe)."""
  bq, bk, seg, end = case
  got = np.asarray(_kinds(jnp.asarray(seg), jnp.asarray(end), bq, bk))
  exact = _brute_kinds(seg, end, bq, bk)
  assert not ((got == bt.EMPTY) & (exact != bt.EMPTY)).any()
  assert not ((got == bt.FULL) & (exact != bt.FULL)).any()


def _features(seg, end, bq, bk):
  """Which named situations a row shows (for the reachability check below)."""
  l = len(seg)
  idx = np.arange(l)
  found = set()
  valid = seg != 0
  if valid.all() and (seg == seg[0]).all():
    if (end == idx).all():
      found.add("all text")
    if (end == l - 1).all():
      found.add("all image")
  ids, counts = np.unique(seg[valid], return_counts=True)
  if (counts == 1).any():
    found.add("one-token segment")
  image = valid & (end > idx)
  starts = np.flatnonzero(image & ~np.r_[False, image[:-1] & (end[:-1] == end[1:])])
  for s in starts:
    last = end[s]
    if last - s + 1 > max(bq, bk):
      found.add("image longer than a block")
    if s // bq != last // bq or s // bk != last // bk:
      found.add("image across a block boundary")
  if 0 < valid.sum() < l and l % math.lcm(bq, bk) == 0 and valid.sum() % math.lcm(bq, bk):
    found.add("used length not a block multiple")
  return found


_FEATURES = ("all text", "all image", "one-token segment", "image longer than a block",
             "image across a block boundary", "used length not a block multiple")


@pytest.mark.parametrize("feature", _FEATURES)
def test_strategy_reaches(feature):
  """The random strategy itself (not only the explicit examples) generates each named edge case."""
  has = lambda c: any(feature in _features(c[2][r], c[3][r], c[0], c[1]) for r in range(_BATCH))
  find(_cases(), has, settings=settings(max_examples=2000, derandomize=True, database=None,
                                        phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
