"""tuna_shapes: the builder writes ArrayRecord that tfds.data_source reads, splits are disjoint, and every
answer agrees with what an independent look at the pixels finds."""

import hashlib
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

from data import shapes, shapes_render

EIGHT = np.ones((3, 3), bool)  # 8-connectivity


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("shapes"))
  shapes.build(d, num_train=40, num_validation=8, num_test=12, seed=3, num_workers=0)
  return d


def _read(data_dir, split):
  src = tfds.data_source("tuna_shapes", split=split, data_dir=data_dir)
  return [src[i] for i in range(len(src))]


def test_written_and_readable(data_dir):
  sizes = {s: len(_read(data_dir, s)) for s in ("train", "validation", "test")}
  assert sizes == dict(train=40, validation=8, test=12)
  r = _read(data_dir, "test")[0]
  assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3
  assert r["image"].shape[0] % 16 == 0 and r["image"].shape[1] % 16 == 0
  assert r["caption"] and r["prompt"] and len(r["qa"]["question"]) >= 3
  assert json.loads(r["meta"])["objects"]


def test_splits_are_disjoint(data_dir):
  seen = {}
  for split in ("train", "validation", "test"):
    recs = _read(data_dir, split)
    assert all(r["id"].decode().startswith(f"shapes/{split}/") for r in recs)
    seen[split] = {hashlib.sha1(r["image"].tobytes() + r["caption"]).hexdigest() for r in recs}
  assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"])
  assert not (seen["validation"] & seen["test"])


def test_sizes_and_aspect_ratios_vary(data_dir):
  shapes_seen = {r["image"].shape[:2] for r in _read(data_dir, "train")}
  assert len(shapes_seen) >= 10 and any(h != w for h, w in shapes_seen)


def _components(image, color):
  mask = (image == np.array(shapes_render.COLORS[color], np.uint8)).all(-1)
  labels, n = ndimage.label(mask, structure=EIGHT)
  boxes = [(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in ndimage.find_objects(labels)]
  return n, boxes


def _check_against_pixels(image, meta, qa):
  """Counts, colors and boxes from connected components of each exact color; answers recomputed."""
  objects = meta["objects"]
  found = {}
  for color in shapes_render.COLORS:
    n, boxes = _components(image, color)
    want = [o for o in objects if o["color"] == color]
    assert n == len(want), (color, n, len(want))
    for o in want:  # each object's pixels form one component inside its box
      x0, y0, x1, y1 = o["bbox"]
      assert any(x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1 and b[2] - b[0] >= (x1 - x0) - 2
                 for b in boxes), (o, boxes)
    found[color] = n
  total = sum(found.values())
  if meta["word"]:
    x0, y0, x1, y1 = meta["word_bbox"]
    ink = (image.max(-1) < 128) & (image.min(-1) == image.max(-1))  # dark gray text pixels
    assert ink[y0:y1 + 1, x0:x1 + 1].sum() > 5 and ink.sum() == ink[y0:y1 + 1, x0:x1 + 1].sum()
  for q, a in qa:
    if q == "How many shapes are there?":
      assert int(a) == total
    elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
      assert int(a) == found[m[1]]
    elif m := re.fullmatch(r"What color is the (\w+)\?", q):
      assert found[a] >= 1 and [o["color"] for o in objects if o["shape"] == m[1]] == [a]


def test_answers_match_pixels_of_written_records(data_dir):
  for r in _read(data_dir, "validation"):
    qa = list(zip([q.decode() for q in r["qa"]["question"]], [a.decode() for a in r["qa"]["answer"]],
                  strict=True))
    _check_against_pixels(r["image"], json.loads(r["meta"]), qa)


def test_answers_match_pixels_of_many_scenes():
  for i in range(150):
    ex = shapes_render.make_scene_example(11, "train", i)
    _check_against_pixels(ex["image"], ex["meta"], [(q["question"], q["answer"]) for q in ex["qa"]])
    for e in ex["edits"]:  # an edit changes exactly what its instruction says
      before = {c: _components(ex["image"], c)[0] for c in shapes_render.COLORS}
      after = {c: _components(e["image"], c)[0] for c in shapes_render.COLORS}
      if m := re.fullmatch(r"Make the (\w+) (\w+) (\w+)\.", e["instruction"]):
        assert after[m[1]] == before[m[1]] - 1 and after[m[3]] == before[m[3]] + 1
      elif m := re.fullmatch(r"Remove the (\w+) (\w+)\.", e["instruction"]):
        assert after[m[1]] == before[m[1]] - 1 and sum(after.values()) == sum(before.values()) - 1
      else:
        m = re.fullmatch(r"Add a (\w+) (\w+) (at|in) the ([\w ]+)\.", e["instruction"])
        assert m and after[m[1]] == before[m[1]] + 1


def test_render_is_deterministic_and_seeds_differ():
  a, b = shapes_render.make_scene_example(0, "train", 5), shapes_render.make_scene_example(0, "train", 5)
  assert np.array_equal(a["image"], b["image"]) and a["qa"] == b["qa"]
  c = shapes_render.make_scene_example(0, "test", 5)
  assert a["caption"] != c["caption"] or not np.array_equal(a["image"], c["image"])


def test_parallel_write_equals_serial(tmp_path):
  """The CLI's parallel path (spawned workers) writes the same records as the serial one."""
  serial = shapes.build(str(tmp_path / "s"), num_train=0, num_test=24, num_workers=0)
  parallel = shapes.build(str(tmp_path / "p"), num_train=0, num_test=24, num_workers=2)
  del serial, parallel
  a = {r["id"]: r for r in _read(str(tmp_path / "s"), "test")}
  b = {r["id"]: r for r in _read(str(tmp_path / "p"), "test")}
  assert a.keys() == b.keys() and len(a) == 24
  for k in a:
    assert np.array_equal(a[k]["image"], b[k]["image"]) and a[k]["caption"] == b[k]["caption"]


def test_small_scenes_are_square_and_answers_match_pixels():
  counts, kinds = set(), set()
  for i in range(150):
    ex = shapes_render.make_scene_example(11, "train", i, scenes="small")
    assert ex["image"].shape == (48, 48, 3)
    n = len(ex["meta"]["objects"])
    assert 1 <= n <= 3 and all(o["bbox"][2] - o["bbox"][0] + 1 >= 10 for o in ex["meta"]["objects"])
    counts.add(n)
    _check_against_pixels(ex["image"], ex["meta"], [(q["question"], q["answer"]) for q in ex["qa"]])
    kinds.update(q["kind"] for q in ex["qa"])
    # Each shape lies inside its own 16-px cell of the 3 x 3 grid, the cell its position answer names.
    cells = [(o["bbox"][0] // 16, o["bbox"][1] // 16, o["bbox"][2] // 16, o["bbox"][3] // 16, o["position"])
             for o in ex["meta"]["objects"]]
    assert all(x0 == x1 and y0 == y1 for x0, y0, x1, y1, _ in cells), cells
    assert len({c[:2] for c in cells}) == n
    names = [["top left", "top", "top right"], ["left", "center", "right"],
             ["bottom left", "bottom", "bottom right"]]
    assert all(names[y][x] == where for x, y, _, _, where in cells), cells
    if ex["meta"]["word"]:  # its ink starts on the patch grid, clear of every shape
      wx0, wy0, wx1, wy1 = ex["meta"]["word_bbox"]
      assert wx0 % 8 == 0 and wy0 % 8 == 0
      assert not any(x0 <= wx1 and wx0 <= x1 and y0 <= wy1 and wy0 <= y1
                     for x0, y0, x1, y1 in (o["bbox"] for o in ex["meta"]["objects"]))
    for e in ex["edits"]:
      added = np.argwhere((e["image"] != ex["image"]).any(-1))
      assert len({(y // 16, x // 16) for y, x in added}) <= 1  # an edit touches one cell only
  assert counts == {1, 2, 3}
  assert kinds == {"count", "color", "position", "ocr"}  # no relation questions in the demo's scenes
  full = {q["kind"] for i in range(30) for q in shapes_render.make_scene_example(11, "train", i)["qa"]}
  assert "relation" in full
  with pytest.raises(ValueError, match="scenes='huge'"):
    shapes_render.make_scene_example(0, "train", 0, scenes="huge")


def test_draw_scenes_hold_one_centered_shape_the_scorer_finds_and_a_word_on_top():
  from tuna2_jax import scoring

  seen, words, moved = set(), 0, 0
  for i in range(60):
    ex = shapes_render.make_scene_example(3, "train", i, scenes="draw")
    (o,) = ex["meta"]["objects"]
    x0, y0, x1, y1 = o["bbox"]
    assert 17 <= x1 - x0 + 1 <= 26 and x1 - x0 == y1 - y0
    assert abs((x0 + x1) / 2 - 23.5) <= 0.5  # the canvas middle, or moved straight down below the word
    middle = abs((y0 + y1) / 2 - 23.5) <= 0.5
    word = ex["meta"]["word"]
    if not middle:
      moved += 1
      assert word and y0 == ex["meta"]["word_bbox"][3] + shapes_render.GAP + 1
    assert o["position"] == "center"
    said = f' and the word "{word}"' if word else ""
    assert ex["prompt"] == f"Draw a {o['color']} {o['shape']} in the center{said} on a white background."
    ink = np.argwhere(ex["image"].max(-1) < 128)  # the word is black; every shape color has a channel > 150
    if word:
      words += 1
      wx0, wy0, wx1, wy1 = ex["meta"]["word_bbox"]
      assert wy0 == 0 and wx0 % 8 == 0 and wy1 < y0  # on the top row, above the shape
      assert len(ink) and ink[:, 0].max() < y0
    else:
      assert len(ink) == 0
    assert scoring.score_image(ex["image"], scoring.parse_prompt(ex["prompt"])).position
    seen.add((o["shape"], o["color"]))
  assert len(seen) >= 15  # shapes and colors drawn independently
  assert 0.6 <= words / 60 <= 0.95  # 80 % of drawings hold a word
  assert 0 < moved < words


def test_builder_configs_are_separate_datasets(tmp_path):
  from tuna2_jax.input import sources

  d = str(tmp_path)
  shapes.build(d, "small", num_train=6, num_test=0, num_workers=0)
  with pytest.raises(sources.DatasetMissingError, match="--config=small"):
    sources.open_source("shapes/small", d, "test")
  with pytest.raises(sources.DatasetMissingError, match="tuna_shapes"):
    sources.open_source("shapes", d, "train")  # the default config, "full", was never built
  small = sources.open_source("shapes/small", d, "train")
  assert len(small) == 6 and all(small[i]["image"].shape == (48, 48, 3) for i in range(6))
