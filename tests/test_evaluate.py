"""Evaluation end to end on a short-trained checkpoint (every artifact written, the periodic hook included),
and its pieces against hand-computed references."""

import json
import os

import numpy as np
import pytest

from configs import tuna2_debug
from tuna2_jax import evaluate, scoring, sequence
from tuna2_jax.input.tokenizer import ByteTokenizer


def small_config(data_dir):
  c = tuna2_debug.get_config()
  # 8 rows: the test session has 8 fake devices on the data axis
  c.data.update(data_dir=data_dir, seq_len=128, global_batch_size=8, max_image_patches=16)
  c.train.update(steps=2, log_every=1)
  c.checkpoint.every = 2
  c.eval.update(every=2, num_examples=3, periodic_examples=3, gen_num=2, gen_steps=2, recon_num=2,
                max_new_tokens=4, batch_size=16)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from data import shapes
  from tuna2_jax import train

  root = tmp_path_factory.mktemp("eval")
  shapes.build(str(root / "data"), num_train=16, num_test=4, num_workers=0)
  config = small_config(str(root / "data"))
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)  # eval.every = 2: the periodic hook runs at the last step
  return config, workdir


def test_periodic_eval_during_training(trained):
  _, workdir = trained
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [2]
  assert "eval/caption_perplexity" in evals[0] and "eval/acc_count" in evals[0]


def test_evaluate_writes_every_artifact(trained):
  config, workdir = trained
  result, paths = evaluate.run(config, workdir)
  assert result.step == 2
  for key in ("json", "report", "samples", "reconstructions"):
    assert os.path.getsize(paths[key]) > 0, key
  saved = json.load(open(paths["json"]))
  assert set(saved["understanding"]) >= {"count"}
  for r in saved["understanding"].values():
    assert 0 <= r["accuracy"] <= 1 and 0 < r["chance"] <= 1 and r["num"] > 0
  assert np.isfinite(saved["caption_perplexity"]) and saved["caption_perplexity_uniform"] == 264
  assert set(scoring.CATEGORIES) <= set(saved["generation"]) and saved["generation"]["num_images"] == 2
  assert saved["generation_reference"]["counting"] >= 0.5  # the scorer on real images
  assert np.isfinite(saved["reconstruction_psnr"])
  report = open(paths["report"]).read()
  assert "| count |" in report and os.path.basename(paths["samples"]) in report
  assert os.listdir(os.path.join(workdir, "tb"))


def test_blind_guesser_accuracy_by_hand():
  questions = ["How many red shapes are there?", "How many blue shapes are there?",
               "How many green shapes are there?", "How many shapes are there?", "How many shapes are there?"]
  answers = ["1", "1", "2", "3", "4"]
  # template "How many _ shapes": "1" twice of 3; template "How many shapes": 1 of 2
  assert evaluate.blind_accuracy(questions, answers) == pytest.approx(3 / 5)
  assert evaluate.question_template("Where is the red circle?") == "Where is the _ _?"


def test_answers_are_normalized():
  assert evaluate.normalize_answer(" Top left.\nHow many") == "top left"
  assert evaluate.normalize_answer("3") == "3"


def test_caption_rows_train_exactly_the_caption():
  from tuna2_jax.input.examples import Example

  tok = ByteTokenizer()
  ex = Example(id="x", image=np.zeros((16, 24, 3), np.uint8), caption="A red circle.")
  rows = evaluate.caption_rows([ex], tok, patch_size=8)
  t = rows["tokens"][0]
  targets = np.roll(t, -1)[rows["text_loss"][0] > 0]  # the loss at i predicts token i + 1
  assert tok.decode(targets[:-1]) == "A red circle." and targets[-1] == tok.special.eos
  assert rows["tokens"].shape[1] % 32 == 0 and (rows["modality"][0] == sequence.PATCH).sum() == 6
