"""Tokenizers behind one interface: `encode(str) -> list[int]`, `decode(ids) -> str`, `special`, `vocab_size`.

`byte` (the default, no files): UTF-8 bytes shifted past the structural tokens, 264 ids, fits the debug/tiny
vocabulary of 512. `hf:<path>`: a HuggingFace `tokenizer.json` through the `tokenizers` library (Qwen2.5's
vocabulary for the real presets); its special tokens are looked up by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from tuna2_jax.sequence import SpecialTokens


class Tokenizer(Protocol):
  special: SpecialTokens
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids `OFFSET + byte`; ids below OFFSET are the structural tokens of `SpecialTokens`."""

  OFFSET = 8  # 6 structural ids (pad, bos, eos, boi, eoi, image) + 2 reserved

  def __init__(self):
    self.special = SpecialTokens()
    self.vocab_size = self.OFFSET + 256

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    """Drops structural ids; invalid UTF-8 (a model mid-training) decodes with replacement characters."""
    return bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size).decode(
        "utf-8", errors="replace")


# Names tried, in order, for each structural token of a HuggingFace tokenizer (Qwen2 / Qwen2-VL first).
HF_SPECIAL_NAMES = {
    "pad": ("<|endoftext|>", "<pad>", "[PAD]"),
    "bos": ("<|im_start|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>"),
    "eos": ("<|endoftext|>", "</s>", "<eos>", "[SEP]"),
    "boi": ("<|vision_start|>", "<boi>", "<image_start>"),
    "eoi": ("<|vision_end|>", "<eoi>", "<image_end>"),
    "image": ("<|image_pad|>", "<image>", "<|image|>"),
}


class HFTokenizer:
  """A `tokenizer.json` read with the `tokenizers` library; no special tokens are added to the text."""

  def __init__(self, path: str):
    import tokenizers  # noqa: PLC0415  (only needed for this tokenizer)

    if not os.path.exists(path):
      raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {path!r} (python -m tuna2_jax.input.bpe "
                              f"trains one on a built dataset)")
    self._tok = tokenizers.Tokenizer.from_file(path)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    ids = {}
    for field, names in HF_SPECIAL_NAMES.items():
      found = [vocab[n] for n in names if n in vocab]
      if not found:
        raise ValueError(f"data.tokenizer: {path} has none of {names} for the {field!r} token; add one "
                         f"of them as a special token")
      ids[field] = found[0]
    self.special = SpecialTokens(**ids)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_from_name(name: str) -> Tokenizer:
  """'byte' or 'hf:<path to tokenizer.json>'."""
  if name == "byte":
    return ByteTokenizer()
  if name.startswith("hf:"):
    return HFTokenizer(name[3:])
  raise ValueError(f"data.tokenizer={name!r}: expected 'byte' or 'hf:<path to tokenizer.json>'")


def get_tokenizer(config) -> Tokenizer:
  """The tokenizer named by `config.data.tokenizer`, checked against `model.vocab_size`."""
  name = config.data.tokenizer
  tok = tokenizer_from_name(name)
  vocab = config.model.get("vocab_size") if "model" in config else None
  if vocab is not None and tok.vocab_size > vocab:
    raise ValueError(f"data.tokenizer={name!r} has {tok.vocab_size} ids but model.vocab_size={vocab}")
  return tok
