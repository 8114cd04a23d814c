"""benchmarks/learnability.py runs end to end and measures what it says (a few steps, no result files)."""

import argparse

import numpy as np
import pytest

from benchmarks import learnability
from data import shapes_render as sr
from tuna2_jax import sequence


def _args(**kw) -> argparse.Namespace:
  base = dict(probe="position", objects="dataset", docs="probe", targets="objects", shape_px="10,13", steps=2,
              lr=4e-3, seed=0, model=[], tag="", examples=40)
  return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
  return learnability.scene_tokenizer(num_scenes=50)


def test_position_rows_ask_about_a_named_object_and_train_on_its_place(tok):
  task = learnability.PositionTask(tok, "one", seed=0)
  rows, answers = task.batch()
  assert rows["tokens"].shape == (learnability.ROWS, learnability.SEQ_LEN)
  for r, answer in enumerate(answers):
    loss_targets = np.roll(rows["tokens"][r], -1)[rows["text_loss"][r] > 0]
    assert tok.decode(loss_targets) == answer  # the loss covers exactly the answer (EOS decodes to "")
    # The place, re-derived from the row's pixels: the shape's box center in the 3 x 3 grid.
    image = sequence.unpatchify(rows["patches"][r][rows["modality"][r] == sequence.PATCH], (6, 6), 8)
    ys, xs = np.nonzero(np.any(image != 255, axis=-1))
    col = ("left", "center", "right")[min(int(3 * (xs.min() + xs.max() + 1) / 2 / 48), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * (ys.min() + ys.max() + 1) / 2 / 48), 2)]
    assert answer == {"middle": col}.get(row, row if col == "center" else f"{row} {col}")


def test_filled_targets_have_the_prompts_colors(tok):
  rows, labels = learnability.ConditioningTask(tok, "filled", seed=0).batch()
  drawn = (rows["image_role"] == 2) & (rows["modality"] == 3)
  for r, (color, _) in enumerate(labels):
    pixels = rows["patches"][r][drawn[r]].reshape(-1, 3)
    np.testing.assert_array_equal(pixels, np.broadcast_to(sr.COLORS[color], pixels.shape))
    assert color in tok.decode(rows["tokens"][r][rows["modality"][r] == 1])


def test_cell_targets_fill_the_cell_the_prompt_names(tok):
  rows, labels = learnability.ConditioningTask(tok, "cell", seed=0).batch()
  names = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
           (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
  for r, (color, (row, col)) in enumerate(labels):
    drawn = (rows["image_role"][r] == 2) & (rows["modality"][r] == 3)
    image = sequence.unpatchify(rows["patches"][r][drawn], (6, 6), 8)
    ys, xs = np.nonzero(np.any(image != 255, axis=-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16 * row, 16 * row + 15, 16 * col, 16 * col + 15)
    np.testing.assert_array_equal(image[ys.min(), xs.min()], sr.COLORS[color])
    prompt = tok.decode(rows["tokens"][r][rows["modality"][r] == 1])
    assert f"{color} " in prompt and f" the {names[row, col]} on" in prompt, prompt


def test_place_accuracy_finds_the_darkest_cell():
  x_hat = np.ones((2, 36, 192), np.float32)  # white canvases
  image = np.ones((48, 48, 3), np.float32)
  image[32:40, 0:8] = -1.0  # ink in cell (2, 0)
  x_hat[0] = sequence.patchify(image, 8)
  x_hat[1] = x_hat[0]
  drawn = np.ones((2, 36), bool)
  assert learnability.place_accuracy(x_hat, drawn, [(2, 0), (0, 2)]) == 0.5


def test_centered_targets_put_one_shape_of_the_asked_size_in_the_middle(tok):
  rows, _ = learnability.ConditioningTask(tok, "centered", seed=0, sizes=(20, 24)).batch()
  for r in range(learnability.ROWS):
    drawn = (rows["image_role"][r] == 2) & (rows["modality"][r] == 3)
    image = sequence.unpatchify(rows["patches"][r][drawn], (6, 6), 8)
    ys, xs = np.nonzero(np.any(image != 255, axis=-1))
    assert 20 <= xs.max() - xs.min() + 1 <= 24
    assert abs((xs.min() + xs.max()) / 2 - 23.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 23.5) <= 1


@pytest.mark.parametrize("docs", ["position", "all", "first", "half"])
def test_document_rows_are_the_trainers_and_the_score_skips_eos(tok, docs):
  task = learnability.DocumentTask(tok, docs, seed=0)
  rows = task.train_batch()
  assert rows["tokens"].shape == (learnability.ROWS, learnability.DOC_SEQ_LEN)
  asked = [[q for q in tok.decode(rows["tokens"][r][rows["modality"][r] == 1]).split("\n") if q.endswith("?")]
           for r in range(learnability.ROWS)]
  questions = [set(qs) for qs in asked]
  asks_place = [all(q.startswith("Where is the") for q in qs) for qs in questions]
  if docs == "position":
    assert all(questions) and all(asks_place)
  elif docs in ("all", "first"):  # a full document may also hold the caption alone
    assert not all(asks_place) and any(len(qs) > 1 for qs in questions)
    for qs in asked if docs == "first" else ():  # place questions lead, when there are any
      places = [i for i, q in enumerate(qs) if q.startswith("Where is the")]
      assert places == list(range(len(places))), qs
  else:  # place-only documents in the even rows, full ones (which may ask only a place too) in the odd
    assert all(questions[::2]) and all(asks_place[::2]) and not all(asks_place[1::2])
  scored, answers = task.batch()
  for r, answer in enumerate(answers):
    assert tok.decode(np.roll(scored["tokens"][r], -1)[scored["text_loss"][r] > 0]) == answer


@pytest.mark.parametrize("kw", [dict(probe="position", objects="one"), dict(probe="position", docs="half"),
                                dict(probe="conditioning", targets="filled", model=["rope=mrope"]),
                                dict(probe="conditioning", targets="cell")])
def test_run_reports_the_measurement(monkeypatch, tok, kw):
  monkeypatch.setattr(learnability, "scene_tokenizer", lambda: tok)
  result = learnability.run(_args(**kw))
  assert result["steps"] == 2 and result["curve"][-1]["step"] == 2
  m = result["measured"]
  if kw["probe"] == "position":
    assert 0.0 <= m["exact_match"] <= 1.0 and m["examples"] == 40
  elif kw["targets"] == "filled":
    for color, rgb in m["mean_rgb_target"].items():  # filled targets: the palette color itself
      np.testing.assert_allclose(rgb, sr.COLORS[color], atol=0.1)
    assert set(m["mean_rgb_painted"]) == set(m["mean_rgb_target"]) and "place_accuracy" not in m
  else:  # one cell of nine in the color: the target mean is 1/9 of the way from white to it
    for color, rgb in m["mean_rgb_target"].items():
      np.testing.assert_allclose(rgb, (8 * np.array(sr.BACKGROUND) + sr.COLORS[color]) / 9, atol=0.1)
    assert 0.0 <= m["place_accuracy"] <= 1.0
