"""Byte and HuggingFace tokenizers behind one interface."""

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from configs import tuna2_debug
from tuna2_jax.input import tokenizer as tok_lib


def test_byte_tokenizer_round_trip_and_vocab():
  tok = tok_lib.get_tokenizer(tuna2_debug.get_config())
  text = "How many circles? 3 — ünïcode"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.vocab_size <= 512 and max(ids) < tok.vocab_size
  sp = tok.special
  structural = [sp.pad, sp.bos, sp.eos, sp.boi, sp.eoi, sp.image]
  assert len(set(structural)) == 6 and max(structural) < tok_lib.ByteTokenizer.OFFSET
  assert tok.decode([sp.bos, *ids, sp.eos]) == text


def _tiny_hf(path, specials):
  t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *specials])
  t.train_from_iterator(["a red circle at the top left", "how many squares are there"] * 10, trainer)
  t.decoder = tokenizers.decoders.ByteLevel()
  t.save(str(path))


def test_hf_tokenizer(tmp_path):
  specials = ["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
  _tiny_hf(tmp_path / "tokenizer.json", specials)
  c = tuna2_debug.get_config()
  c.data.tokenizer = f"hf:{tmp_path / 'tokenizer.json'}"
  tok = tok_lib.get_tokenizer(c)
  ids = tok.encode("a red square")
  assert tok.decode(ids) == "a red square"
  assert tok.special.boi != tok.special.eoi and tok.vocab_size < 512


def test_hf_tokenizer_errors(tmp_path):
  _tiny_hf(tmp_path / "t.json", ["<|endoftext|>"])
  with pytest.raises(ValueError, match="'boi' token"):
    tok_lib.tokenizer_from_name(f"hf:{tmp_path / 't.json'}")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tok_lib.tokenizer_from_name(f"hf:{tmp_path / 'missing.json'}")
  with pytest.raises(ValueError, match="data.tokenizer"):
    tok_lib.tokenizer_from_name("sentencepiece")
