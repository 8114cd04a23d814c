"""A byte-level BPE `tokenizer.json` trained on a dataset's own text (captions, prompts, questions, answers).

  python -m tuna2_jax.input.bpe --dataset=shapes/small --data_dir=runs/demo/data --vocab_size=512
  then: --config.data.tokenizer=hf:runs/demo/data/tokenizer_shapes_small_512.json

The byte tokenizer spends a token per character; a small model trained from scratch on a closed vocabulary
learns faster when "triangles" is one token (the shapes texts are ~4x shorter). The byte-level alphabet
stays in the vocabulary, so any text still encodes. Structural tokens come first, named as
tokenizer.HFTokenizer looks them up, so their ids equal `SpecialTokens()`'s defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import tokenizers
from absl import app, flags
from tokenizers import decoders, models, pre_tokenizers, trainers

from tuna2_jax.input import examples as examples_lib
from tuna2_jax.input import tasks
from tuna2_jax.input.sources import SafeSource, open_source

# In SpecialTokens' field order (pad, bos, eos, boi, eoi, image) -> ids 0..5.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<boi>", "<eoi>", "<image>")


def dataset_texts(dataset: str, data_dir: str, split: str = "train", limit: int = 0) -> Iterator[str]:
  """Every text of the first `limit` records (0 = all) of a built dataset, as the task templates use it."""
  yield from (tasks.CAPTION_QUESTION, tasks.COMPARE_QUESTION)
  src = SafeSource(open_source(dataset, data_dir, split), dataset)
  decode = examples_lib.DecodeExamples(max_skip_fraction=1.0)
  for i in range(min(limit, len(src)) if limit else len(src)):
    ex = decode.map(src[i])
    if ex is None:
      continue
    yield from example_texts(ex.caption, ex.prompt, ex.qa)
    yield from (instruction for instruction, _ in ex.edits)


def example_texts(caption: str | None, prompt: str | None, qa: Iterable[dict]) -> Iterator[str]:
  """One record's caption, prompt and question/answer turns, as the understanding template writes them."""
  yield from filter(None, (caption, prompt))
  yield from (f"{q['question']}\n{q['answer']}" for q in qa)


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """Byte-level BPE with the structural tokens first; deterministic for the same texts in the same order."""
  base = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < base:
    raise ValueError(f"vocab_size={vocab_size} is below the {base} ids of the byte alphabet and specials")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def tokenizer_path(dataset: str, data_dir: str, vocab_size: int) -> str:
  return os.path.join(data_dir, f"tokenizer_{dataset.replace('/', '_')}_{vocab_size}.json")


def build(dataset: str, data_dir: str, vocab_size: int = 512, limit: int = 0) -> str:
  """Trains and writes the tokenizer of `dataset` next to it unless it is there; its path."""
  path = tokenizer_path(dataset, data_dir, vocab_size)
  if not os.path.exists(path):
    tok = train_bpe(dataset_texts(dataset, data_dir, limit=limit), vocab_size)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written tokenizer under the final name
  return path


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  path = build(f.dataset, f.data_dir, f.vocab_size, f.limit)
  print(f"wrote {path}; use --config.data.tokenizer=hf:{path}")


if __name__ == "__main__":
  flags.DEFINE_string("dataset", "shapes", "a data.dataset name (one dataset, not a mixture)")
  flags.DEFINE_string("data_dir", "runs/data", "where the dataset was built (the tokenizer goes there too)")
  flags.DEFINE_integer("vocab_size", 512, "ids in all, structural tokens and the byte alphabet included")
  flags.DEFINE_integer("limit", 0, "records read (0 = the whole train split)")
  app.run(main)
