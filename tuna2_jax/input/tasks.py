"""Task templates: an `Example` -> one document of the packed-sequence contract.

  understand  [BOS] [image, role 1] question answer question answer ... EOS   (loss on answers)
  generate    [BOS] prompt [image, role 2]                                    (flow loss on the image)
  edit        [BOS] [source, role 1] instruction [target, role 2]
  text        [BOS] caption and questions with answers EOS                    (loss on all of it)
  compare     [BOS] [image A, role 1] [image B, role 1] "What changed?" instruction EOS
              (an interleaved multi-image document from an editing pair; loss on the instruction)

Generation targets come last in their document (the contract). For classifier-free guidance a generation or
edit document drops its prompt / instruction with probability `cfg_drop_prob`, leaving the bare [BOS]:
exactly the unconditional row `generation_row(tok, None, h, w)` builds at sampling time.
Images are sized per document so the whole document fits one row (see images.py for the rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tuna2_jax.input import examples as examples_lib
from tuna2_jax.input import images
from tuna2_jax.input.tokenizer import Tokenizer
from tuna2_jax.sequence import Document, Image, Text, pack_documents

TASKS = ("understand", "generate", "edit", "text", "compare")
COMPARE_QUESTION = "What changed from the first image to the second?"
CAPTION_QUESTION = "Describe the image."


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  seq_len: int
  patch_size: int
  max_image_patches: int = 256
  image_mode: str = "free"  # free | buckets
  bucket_aspects: tuple[float, ...] = images.DEFAULT_BUCKET_ASPECTS
  cfg_drop_prob: float = 0.1
  max_qa_turns: int = 4
  # Question kinds asked first, right after the image. With 1-D RoPE a small model reads where a patch is
  # from how far it lies from the question, which teaches a place only when that distance is the same each
  # time (benchmarks/learnability.py --docs; docs/demo_tuning.md).
  qa_first_kinds: tuple[str, ...] = ()
  qa_first_prob: float = 1.0  # the share of documents that put qa_first_kinds first (the rest: random order)
  min_image_patches: int = 4  # below this an image says too little; drop turns (or the document) instead


def available_tasks(ex: examples_lib.Example) -> list[str]:
  """The tasks this example has the fields for."""
  out = []
  if ex.qa or ex.caption:
    out += ["understand", "text"]
  if ex.prompt or ex.caption:
    out.append("generate")
  if ex.edits:
    out += ["edit", "compare"]
  return [t for t in TASKS if t in out]


def choose_task(ex: examples_lib.Example, weights: dict[str, float], rng: np.random.Generator) -> str | None:
  """A task drawn by `weights`, renormalised over the tasks this example supports."""
  tasks = [t for t in available_tasks(ex) if weights.get(t, 0) > 0]
  if not tasks:
    return None
  p = np.array([weights[t] for t in tasks], np.float64)
  return tasks[int(rng.choice(len(tasks), p=p / p.sum()))]


def _image_budget(opts: TaskOptions, text_tokens: int, num_images: int) -> int:
  """Patches each image may use so that text + image spans fill at most one row."""
  free = opts.seq_len - text_tokens - 3 * num_images  # 3 = BOI, TIME, EOI
  return min(opts.max_image_patches, free // num_images)


def _fit(pixels: np.ndarray, opts: TaskOptions, budget: int) -> np.ndarray:
  return images.fit_image(pixels, patch_size=opts.patch_size, max_patches=budget, mode=opts.image_mode,
                          aspects=opts.bucket_aspects)


def understanding_document(ex: examples_lib.Example, rng: np.random.Generator, tok: Tokenizer,
                           opts: TaskOptions) -> Document | None:
  """Image, then 1..max_qa_turns question/answer turns (the caption is one more possible turn).

  The caption, when drawn, is always the last turn: it states counts, colors, positions and the word, so a
  question after it could copy its answer from the text instead of reading the image.
  """
  turns = [(q["question"], q["answer"]) for q in ex.qa]
  if ex.caption:
    turns.append((CAPTION_QUESTION, ex.caption))
  order = rng.permutation(len(turns))
  # Stable: those kinds move to the front, before the cut, so they are always asked.
  if opts.qa_first_kinds and rng.random() < opts.qa_first_prob:
    order = sorted(order, key=lambda i: i >= len(ex.qa) or ex.qa[i].get("kind") not in opts.qa_first_kinds)
  order = order[:int(rng.integers(1, min(opts.max_qa_turns, len(turns)) + 1))]
  if ex.caption:
    order = sorted(order, key=lambda i: i == len(turns) - 1)  # stable: the caption moves to the end
  sp = tok.special
  parts = []
  for j, i in enumerate(order):
    q, a = turns[i]
    last = j == len(order) - 1
    parts.append(Text(tok.encode(q + "\n"), loss=False))
    parts.append(Text(tok.encode(a) + [sp.eos] if last else tok.encode(a + "\n"), loss=True))
  while parts:
    budget = _image_budget(opts, 1 + sum(len(p.ids) for p in parts), 1)
    if budget >= opts.min_image_patches:
      return [Text([sp.bos], loss=False), Image(_fit(ex.image, opts, budget), "understand"), *parts]
    parts = parts[:-2]  # too long: drop the last turn
    if parts:
      parts[-1] = Text(list(parts[-1].ids[:-len(tok.encode("\n"))]) + [sp.eos], loss=True)
  return None


def generation_document(prompt_ids: Sequence[int], pixels: np.ndarray, tok: Tokenizer) -> Document:
  """[BOS] prompt [target image]; empty `prompt_ids` is the unconditional document of CFG."""
  return [Text([tok.special.bos, *prompt_ids], loss=False), Image(pixels, "generate")]


def generation_row(tok: Tokenizer, prompt: str | None, height: int, width: int, *, seq_len: int,
                   patch_size: int) -> dict[str, np.ndarray]:
  """One packed row to sample an image of `height` x `width` from `prompt` (None or '' = unconditional).

  The target pixels are zeros (the sampler overwrites the noised patches); everything else matches training.
  """
  pixels = np.zeros((height, width, 3), np.uint8)
  doc = generation_document(tok.encode(prompt) if prompt else [], pixels, tok)
  return pack_documents([doc], seq_len=seq_len, patch_size=patch_size, special=tok.special)


def _drop_condition(rng: np.random.Generator, opts: TaskOptions) -> bool:
  return opts.cfg_drop_prob > 0 and rng.random() < opts.cfg_drop_prob


def generate_task(ex: examples_lib.Example, rng: np.random.Generator, tok: Tokenizer,
                  opts: TaskOptions) -> Document | None:
  ids = [] if _drop_condition(rng, opts) else tok.encode(ex.prompt or ex.caption)
  budget = _image_budget(opts, 1 + len(ids), 1)
  if budget < opts.min_image_patches:
    return None
  return generation_document(ids, _fit(ex.image, opts, budget), tok)


def edit_document(ex: examples_lib.Example, rng: np.random.Generator, tok: Tokenizer,
                  opts: TaskOptions) -> Document | None:
  """[BOS] [source] instruction [target]; source and target share one size (the source's fitted size)."""
  instruction, target = ex.edits[int(rng.integers(len(ex.edits)))]
  ids = [] if _drop_condition(rng, opts) else tok.encode(instruction)
  budget = _image_budget(opts, 1 + len(ids), 2)
  if budget < opts.min_image_patches:
    return None
  src = _fit(ex.image, opts, budget)
  tgt = images.resize(_fit(target, opts, budget), *src.shape[:2])
  parts = [Text([tok.special.bos], loss=False), Image(src, "understand")]
  if ids:
    parts.append(Text(ids, loss=False))
  return [*parts, Image(tgt, "generate")]


def text_document(ex: examples_lib.Example, rng: np.random.Generator, tok: Tokenizer,
                  opts: TaskOptions) -> Document:
  """Caption and question/answer lines as plain text, truncated to one row."""
  del rng
  lines = [ex.caption] if ex.caption else []
  lines += [f"{q['question']} {q['answer']}" for q in ex.qa]
  ids = [tok.special.bos, *tok.encode("\n".join(lines))][:opts.seq_len - 1] + [tok.special.eos]
  return [Text(ids, loss=True)]


def compare_document(ex: examples_lib.Example, rng: np.random.Generator, tok: Tokenizer,
                     opts: TaskOptions) -> Document | None:
  """Two understanding images in one document, then a question whose answer needs both."""
  instruction, target = ex.edits[int(rng.integers(len(ex.edits)))]
  question, answer = tok.encode(COMPARE_QUESTION + "\n"), tok.encode(instruction) + [tok.special.eos]
  budget = _image_budget(opts, 1 + len(question) + len(answer), 2)
  if budget < opts.min_image_patches:
    return None
  src = _fit(ex.image, opts, budget)
  tgt = images.resize(_fit(target, opts, budget), *src.shape[:2])
  return [Text([tok.special.bos], loss=False), Image(src, "understand"), Image(tgt, "understand"),
          Text(question, loss=False), Text(answer, loss=True)]


_TEMPLATES = dict(understand=understanding_document, generate=generate_task, edit=edit_document,
                  text=text_document, compare=compare_document)


def make_document(ex: examples_lib.Example, task: str, rng: np.random.Generator, tok: Tokenizer,
                  opts: TaskOptions) -> Document | None:
  """The document of `task` for `ex`, or None (counted as 'too_long') if it cannot fit one row."""
  if task not in _TEMPLATES:
    raise ValueError(f"data.task_weights: unknown task {task!r}; expected one of {TASKS}")
  doc = _TEMPLATES[task](ex, rng, tok, opts)
  if doc is None:
    examples_lib.count_skip("too_long")
  return doc
