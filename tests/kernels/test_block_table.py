"""Block table exactness: EMPTY / FULL / PARTIAL per tile equal the dense mask's none / all / some."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
