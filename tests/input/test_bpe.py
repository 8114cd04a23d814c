"""The dataset-trained BPE tokenizer: exact round trips, structural ids where SpecialTokens puts them, shorter
than bytes, read back through the hf: tokenizer, and never half-written."""

import os

import pytest

from configs import tuna2_debug
from tuna2_jax.input import bpe, tasks
from tuna2_jax.input import tokenizer as tok_lib
from tuna2_jax.sequence import SpecialTokens


@pytest.fixture(scope="module")
def texts(shapes_dir):
  return list(bpe.dataset_texts("shapes", shapes_dir))


@pytest.fixture(scope="module")
def tokenizer_path(shapes_dir):
  return bpe.build("shapes", shapes_dir, vocab_size=400)


def test_texts_cover_every_field(texts):
  assert tasks.CAPTION_QUESTION in texts and tasks.COMPARE_QUESTION in texts
  assert any(t.startswith("A picture of") for t in texts) and any(t.startswith("Draw ") for t in texts)
  assert any(t.startswith("How many") and "\n" in t for t in texts)
  assert any(t.startswith(("Make the", "Remove the", "Add a")) for t in texts)


def test_round_trip_specials_and_length(texts, tokenizer_path):
  c = tuna2_debug.get_config()
  c.data.tokenizer = f"hf:{tokenizer_path}"
  tok = tok_lib.get_tokenizer(c)
  assert tok.special == SpecialTokens() and tok.vocab_size == 400
  byte = tok_lib.ByteTokenizer()
  n_bpe = n_byte = 0
  for t in [*texts, "unseen: ünïcode, Zebra 42!"]:
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    assert min(ids) >= len(bpe.SPECIAL_TOKENS)  # text never encodes to a structural id
    n_bpe, n_byte = n_bpe + len(ids), n_byte + len(byte.encode(t))
  assert n_byte > 3 * n_bpe  # words of a closed vocabulary become single tokens
  assert tok.decode([tok.special.bos, *tok.encode("a red circle"), tok.special.eos]) == "a red circle"


def test_build_is_deterministic_and_idempotent(shapes_dir, tokenizer_path, tmp_path):
  again = bpe.train_bpe(bpe.dataset_texts("shapes", shapes_dir), 400)
  again.save(str(tmp_path / "again.json"))
  with open(tokenizer_path) as a, open(tmp_path / "again.json") as b:
    assert a.read() == b.read()
  mtime = os.path.getmtime(tokenizer_path)
  assert bpe.build("shapes", shapes_dir, vocab_size=400) == tokenizer_path
  assert os.path.getmtime(tokenizer_path) == mtime
  assert not os.path.exists(tokenizer_path + ".tmp")


def test_vocab_below_the_alphabet_is_refused():
  with pytest.raises(ValueError, match="vocab_size=100"):
    bpe.train_bpe(["a red circle"], 100)
