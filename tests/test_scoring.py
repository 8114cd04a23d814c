"""The generation scorer against the dataset builder's ground truth: it recovers count, colors, shapes and
positions from the builder's own images, and rejects images that do not match the prompt."""

import dataclasses

import numpy as np
import pytest

from data import shapes_render
from tuna2_jax import scoring
from tuna2_jax.evaluate import psnr
from tuna2_jax.input import images

N = 120  # held-out scenes; ~3 s


def scenes(n=N):
  for i in range(n):
    ex = shapes_render.make_scene_example(7, "test", i)
    truth = [scoring.SceneObject(o["shape"], o["color"], o["position"]) for o in ex["meta"]["objects"]]
    yield ex, truth


def test_prompt_parser_recovers_the_builders_objects():
  for ex, truth in scenes():
    assert scoring.parse_prompt(ex["prompt"]) == truth, ex["prompt"]


def test_grid_position_matches_the_renderer():
  rng = np.random.default_rng(0)
  for _ in range(500):
    w, h = rng.integers(16, 200, 2)
    size = int(rng.integers(2, min(w, h)))
    x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    scene = shapes_render.Scene(int(w), int(h), ())
    shape = shapes_render.Shape("square", "red", x0, y0, size)
    assert scoring.grid_position(shape.bbox, w, h) == scene.position(shape)


def test_recovers_every_object_of_native_images():
  for ex, truth in scenes():
    found = scoring.find_objects(ex["image"])
    assert sorted(d.as_object() for d in found) == sorted(truth), ex["prompt"]
    # boxes are the renderer's exactly (no antialiasing at native size)
    boxes = sorted(tuple(o["bbox"]) for o in ex["meta"]["objects"])
    assert sorted(d.bbox for d in found) == boxes
    s = scoring.score_image(ex["image"], truth)
    assert s.counting and s.colors and s.shapes and s.color_attr and s.position and s.object_recall == 1.0


def test_resized_images_mostly_recovered():
  """At the demo's eval size (<= 64 x 64) small shapes blur: the scorer's ceiling is measured, not 100%."""
  scores = [scoring.score_image(images.fit_image(ex["image"], patch_size=8, max_patches=64), truth)
            for ex, truth in scenes()]
  agg = scoring.aggregate(scores)
  assert agg["counting"] >= 0.97 and agg["colors"] >= 0.97, agg
  assert agg["position"] >= 0.8 and agg["all_correct_1_object"] >= 0.9, agg


def _first(pred):
  return next((ex, truth) for ex, truth in scenes() if pred(truth))


@pytest.mark.parametrize("change", ["color", "shape", "position", "extra", "missing"])
def test_rejects_wrong_prompts(change):
  ex, truth = _first(lambda t: len(t) == 2 and t[0].position != t[1].position)
  o = truth[0]
  if change == "color":
    wrong = [dataclasses.replace(o, color=next(c for c in shapes_render.COLORS if c != o.color)), truth[1]]
    failing = ("colors", "color_attr", "position")
  elif change == "shape":
    wrong = [dataclasses.replace(o, shape=next(s for s in shapes_render.SHAPES if s != o.shape)), truth[1]]
    failing = ("shapes", "color_attr", "position")
  elif change == "position":
    wrong = [dataclasses.replace(o, position=next(p for p in scoring.POSITIONS if p != o.position)), truth[1]]
    failing = ("position",)
  elif change == "extra":
    wrong = [*truth, scoring.SceneObject("circle", "red", "center")]
    failing = scoring.CATEGORIES
  else:
    wrong = truth[:1]
    failing = scoring.CATEGORIES  # multisets: one object too few changes every one
  s = scoring.score_image(ex["image"], wrong)
  for category in scoring.CATEGORIES:
    assert getattr(s, category) == (category not in failing), (change, category)


def test_blank_and_noise_images_have_no_objects():
  assert scoring.find_objects(np.full((64, 64, 3), 255, np.uint8)) == []
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  s = scoring.score_image(noise, [scoring.SceneObject("circle", "red", "center")])
  assert not s.position and s.object_recall == 0.0


def test_recoloring_an_object_is_seen():
  ex, truth = _first(lambda t: len(t) == 1)
  img = ex["image"].copy()
  mask = (img == shapes_render.COLORS[truth[0].color]).all(-1)
  new = next(c for c in shapes_render.COLORS if c != truth[0].color)
  img[mask] = shapes_render.COLORS[new]
  assert not scoring.score_image(img, truth).colors
  assert scoring.score_image(img, [dataclasses.replace(truth[0], color=new)]).position


def test_reads_the_word_of_native_images():
  """Every word the builder drew (full scenes, the demo's drawings) is read back; none where it drew none."""
  draw = [shapes_render.make_scene_example(7, "test", i, "draw") for i in range(40)]
  exs = [ex for ex, _ in scenes()] + draw
  words = [scoring.parse_prompt_word(ex["prompt"]) for ex in exs]
  assert {w is None for w in words} == {True, False}
  for ex, word in zip(exs, words, strict=True):
    assert word is None or word in shapes_render.WORDS, ex["prompt"]
    assert scoring.read_word(ex["image"]) == word, ex["prompt"]
    assert scoring.score_image(ex["image"], [], word).text is (None if word is None else True)


def test_rejects_a_wrong_or_missing_word():
  ex = next(ex for ex, _ in scenes() if scoring.parse_prompt_word(ex["prompt"]))
  word = scoring.parse_prompt_word(ex["prompt"])
  other = next(w for w in shapes_render.WORDS if w != word)
  assert scoring.score_image(ex["image"], [], other).text is False
  blank = np.full_like(ex["image"], 255)
  assert scoring.read_word(blank) is None and scoring.score_image(blank, [], word).text is False
  # the ink of every other pixel column erased: no word matches well enough any more (IoU < min_iou)
  img = ex["image"].copy()
  erase = scoring.text_ink(img)
  erase[:, ::2] = False
  img[erase] = 255
  assert scoring.read_word(img) is None


def test_text_is_aggregated_over_prompts_with_a_word():
  s = lambda text: scoring.ImageScore(True, True, True, True, True, 1.0, 1, (), text=text)  # noqa: E731
  agg = scoring.aggregate([s(True), s(False), s(None), s(True)])
  assert agg["text"] == 2 / 3 and agg["num_text"] == 3 and agg["geneval"] == 1.0
  assert "text" not in scoring.aggregate([s(None)])


def test_psnr_matches_numpy():
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
  mse = ((a.astype(np.float64) - b) ** 2).reshape(3, -1).mean(1)
  want = np.mean(20 * np.log10(255.0) - 10 * np.log10(mse))
  np.testing.assert_allclose(psnr(a, b), want, rtol=1e-12)
  np.testing.assert_allclose(psnr(a[0], b[0]), 20 * np.log10(255.0) - 10 * np.log10(mse[0]), rtol=1e-12)
