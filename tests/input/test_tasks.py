"""Task templates: the interleaved multi-image 'compare' document."""

import numpy as np
from contract_check import check_row

from tuna2_jax import sequence as seq
from tuna2_jax.input import tasks
from tuna2_jax.input.examples import Example
from tuna2_jax.input.tokenizer import tokenizer_from_name


def test_compare_document_interleaves_two_images_and_trains_on_the_answer():
  tok = tokenizer_from_name("byte")
  src = np.full((32, 48, 3), 200, np.uint8)
  tgt = np.full((32, 48, 3), 30, np.uint8)
  ex = Example(id="x", image=src, edits=[("make the circle blue", tgt)])
  assert "compare" in tasks.available_tasks(ex)
  opts = tasks.TaskOptions(seq_len=256, patch_size=8)
  doc = tasks.make_document(ex, "compare", np.random.default_rng(0), tok, opts)
  row = seq.pack_documents([doc], seq_len=256, patch_size=8, special=tok.special)
  check_row(row, seq_len=256, patch_size=8, special=tok.special)
  ids = row["image_ids"]
  assert set(np.unique(ids[ids > 0])) == {1, 2}
  assert (row["image_role"][ids > 0] == seq.UNDERSTAND).all()
  assert len(np.unique(row["segment_ids"][row["segment_ids"] > 0])) == 1     # one document, two images
  # The loss predicts exactly the answer (instruction + EOS), and the answer sees both images.
  targets = row["tokens"][1:][row["text_loss"][:-1] > 0]
  assert tok.decode([t for t in targets if t != tok.special.eos]) == "make the circle blue"
  first_answer = int(np.flatnonzero(row["text_loss"])[0])
  mask = seq.dense_mask(row["segment_ids"], row["attn_end"])
  assert mask[first_answer, ids == 1].all() and mask[first_answer, ids == 2].all()
  # The first image cannot see the second.
  assert not mask[np.ix_(ids == 1, ids == 2)].any()


def test_understanding_turns_never_follow_the_caption():
  """Questions come before the caption, which would otherwise give their answers away."""
  tok = tokenizer_from_name("byte")
  qa = [dict(kind="count", question=f"How many q{i}?", answer=str(i)) for i in range(5)]
  ex = Example(id="x", image=np.full((16, 16, 3), 9, np.uint8), caption="A picture of five shapes.", qa=qa)
  opts = tasks.TaskOptions(seq_len=512, patch_size=8, max_qa_turns=6)
  saw_caption, saw_several = False, set()
  for seed in range(40):
    doc = tasks.make_document(ex, "understand", np.random.default_rng(seed), tok, opts)
    text = tok.decode([i for part in doc if isinstance(part, seq.Text) for i in part.ids])
    questions = [line for line in text.split("\n") if line.endswith("?") or line == tasks.CAPTION_QUESTION]
    saw_several.add(len(questions))
    if tasks.CAPTION_QUESTION in questions:
      saw_caption = True
      assert questions[-1] == tasks.CAPTION_QUESTION, questions
  assert saw_caption and len(saw_several) > 3


def test_first_kinds_are_always_asked_right_after_the_image():
  tok = tokenizer_from_name("byte")
  qa = ([dict(kind="count", question=f"How many q{i}?", answer=str(i)) for i in range(4)]
        + [dict(kind="position", question=f"Where is p{i}?", answer="top") for i in range(2)])
  ex = Example(id="x", image=np.full((16, 16, 3), 9, np.uint8), caption="A picture.", qa=qa)
  first = tasks.TaskOptions(seq_len=512, patch_size=8, max_qa_turns=8, qa_first_kinds=("position",))
  anywhere = tasks.TaskOptions(seq_len=512, patch_size=8, max_qa_turns=8)
  later = 0
  for seed in range(40):
    for opts in (first, anywhere):
      doc = tasks.make_document(ex, "understand", np.random.default_rng(seed), tok, opts)
      text = tok.decode([i for part in doc if isinstance(part, seq.Text) for i in part.ids])
      questions = [line for line in text.split("\n") if line.endswith("?")]
      places = [i for i, q in enumerate(questions) if q.startswith("Where")]
      if opts is first:
        assert places == [0, 1][:len(places)] and places, questions  # one or both, and first
      else:
        later += any(i > 1 for i in places)
  assert later  # without the option they land anywhere


def test_first_kinds_in_a_share_of_documents():
  """qa_first_prob p: a place comes first in p of the documents plus (1 - p) of the random-order rate."""
  tok = tokenizer_from_name("byte")
  qa = ([dict(kind="count", question=f"How many q{i}?", answer=str(i)) for i in range(4)]
        + [dict(kind="position", question="Where is p?", answer="top")])
  ex = Example(id="x", image=np.full((16, 16, 3), 9, np.uint8), caption="A picture.", qa=qa)

  def place_first_rate(**kw) -> float:
    opts = tasks.TaskOptions(seq_len=512, patch_size=8, max_qa_turns=8, **kw)
    hits = 0
    for seed in range(600):
      doc = tasks.make_document(ex, "understand", np.random.default_rng(seed), tok, opts)
      hits += tok.decode(list(doc[2].ids)).startswith("Where")
    return hits / 600

  anywhere = place_first_rate()
  assert 0.1 < anywhere < 0.3  # one of 6 turns (the caption never first unless alone)
  half = place_first_rate(qa_first_kinds=("position",), qa_first_prob=0.5)
  assert abs(half - (0.5 + 0.5 * anywhere)) < 0.07, (half, anywhere)
  assert place_first_rate(qa_first_kinds=("position",), qa_first_prob=1.0) == 1.0
