"""The Grain input pipeline: records -> examples -> task documents -> packed rows -> per-process batches.

  source[process_index::process_count] -> shuffle (reshuffled every epoch) -> repeat -> decode (skip bad
  records) -> task document (random, seeded per element) -> mix sources -> pack rows -> batch -> workers

Everything is a pure function of (config, element index), so `get_state()` / `set_state()` of the iterator
restore the exact next batch, with or without worker processes; Orbax saves that state with
`grain.checkpoint.CheckpointSave(iterator)`.

  it = make_train_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)  # dict of the contract fields, leading axis global_batch_size // process_count
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from tuna2_jax.input import examples as examples_lib
from tuna2_jax.input import images, packing, tasks, tokenizer
from tuna2_jax.input.sources import MixtureItem, SafeSource, open_source, parse_mixture

# The paper's mixture: generation : understanding = 7 : 3 over image data, plus 20% text-only; we give an
# eighth of the generation share to editing.
DEFAULT_TASK_WEIGHTS = dict(understand=0.2, compare=0.04, generate=0.49, edit=0.07, text=0.2)


def _get(config, key: str, default):
  """`config.data.<key>`, or `default` for configs written before the field existed."""
  return config.data.get(key, default)


def task_options(config) -> tasks.TaskOptions:
  return tasks.TaskOptions(
      seq_len=config.data.seq_len, patch_size=config.model.patch_size,
      max_image_patches=_get(config, "max_image_patches", 256), image_mode=_get(config, "image_mode", "free"),
      bucket_aspects=tuple(_get(config, "bucket_aspects", images.DEFAULT_BUCKET_ASPECTS)),
      cfg_drop_prob=_get(config, "cfg_drop_prob", 0.1), max_qa_turns=_get(config, "max_qa_turns", 4),
      qa_first_kinds=tuple(_get(config, "qa_first_kinds", ())),
      qa_first_prob=float(_get(config, "qa_first_prob", 1.0)))


def task_weights(config) -> dict[str, float]:
  weights = dict(_get(config, "task_weights", DEFAULT_TASK_WEIGHTS))
  unknown = sorted(set(weights) - set(tasks.TASKS))
  if unknown or not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
    raise ValueError(f"data.task_weights={weights}: keys must be in {tasks.TASKS}, weights >= 0, one > 0")
  return weights


class MakeDocument(grain.transforms.RandomMap):
  """Example -> arrays of one task document; task, prompt drop and turns come from the element's rng."""

  def __init__(self, *, tokenizer_name: str, opts: tasks.TaskOptions, weights: dict[str, float]):
    self.tokenizer_name, self.opts, self.weights = tokenizer_name, opts, weights
    self._tok = None  # built lazily: each worker process builds its own

  def random_map(self, ex: examples_lib.Example, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    if self._tok is None:
      self._tok = tokenizer.tokenizer_from_name(self.tokenizer_name)
    task = tasks.choose_task(ex, self.weights, rng)
    doc = None if task is None else tasks.make_document(ex, task, rng, self._tok, self.opts)
    if doc is None:
      return None
    return packing.document_arrays(doc, patch_size=self.opts.patch_size, special=self._tok.special)


def validate_data_config(config, process_count: int = 1) -> None:
  """Fails early with a message naming the field."""
  d = config.data
  if d.global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  if d.seq_len < 16:
    raise ValueError(f"data.seq_len={d.seq_len} is too short for an image document (>= 16)")
  for field, default in (("cfg_drop_prob", 0.1), ("qa_first_prob", 1.0)):
    if not 0 <= _get(config, field, default) <= 1:
      raise ValueError(f"data.{field}={d[field]} must be in [0, 1]")
  if d.num_workers < 0:
    raise ValueError(f"data.num_workers={d.num_workers} must be >= 0")
  for item in parse_mixture(d.dataset):
    source_task_weights(config, item)


def source_task_weights(config, item: MixtureItem) -> dict[str, float]:
  """data.task_weights kept to the tasks the mixture allows `item`; an error naming it if none is left."""
  everywhere = task_weights(config)
  weights = {t: w for t, w in everywhere.items() if w > 0 and item.allows(t)}
  if not weights:
    raise ValueError(f"data.dataset: {item.name!r} may only become {'+'.join(item.tasks)}, and "
                     f"data.task_weights={everywhere} gives none of them a weight")
  return weights


def examples_dataset(config, source, *, name: str, seed: int, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
  """This process's shard of one source as an endless, per-epoch reshuffled MapDataset of `Example`s
  (None where a record was skipped)."""
  if len(source) < process_count:
    raise ValueError(f"data.dataset: {name!r} has {len(source)} records, fewer than the {process_count} "
                     f"processes")
  decode = examples_lib.DecodeExamples(
      image_key=_get(config, "image_key", "image"), text_key=_get(config, "text_key", "caption"),
      max_side=_get(config, "max_image_side", 4096),
      max_skip_fraction=_get(config, "max_skip_fraction", 0.05))
  # Shard before shuffling: strided shards are disjoint whatever the seed, and each is reshuffled per epoch.
  ds = grain.MapDataset.source(SafeSource(source, name))[process_index::process_count]
  return ds.shuffle(seed=seed).repeat(None).map(decode)


def make_dataset(config, *, process_index: int = 0, process_count: int = 1, split: str | None = None,
                 sources: dict | None = None) -> grain.IterDataset:
  """The packed, batched training dataset of this process. `sources` ({name: random-access source})
  replaces reading `data.data_dir` (tests, custom data)."""
  validate_data_config(config, process_count)
  d = config.data
  split = split or _get(config, "train_split", "train")
  special, opts = tokenizer.get_tokenizer(config).special, task_options(config)
  parts, weights = [], []
  for k, item in enumerate(parse_mixture(d.dataset)):
    src = sources[item.name] if sources is not None else open_source(item.name, d.data_dir, split)
    ds = examples_dataset(config, src, name=item.name, seed=d.seed + 7919 * k, process_index=process_index,
                          process_count=process_count)
    make_doc = MakeDocument(tokenizer_name=d.tokenizer, opts=opts, weights=source_task_weights(config, item))
    parts.append(ds.random_map(make_doc, seed=d.seed + 7919 * k + 1))
    weights.append(item.weight)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=_get(config, "read_threads", 1),
                                             prefetch_buffer_size=_get(config, "prefetch", 16)))
  rows = packing.pack(ids, seq_len=d.seq_len, special=special, method=_get(config, "packing", "first_fit"),
                      num_bins=_get(config, "packing_bins", 16), seed=d.seed)
  batches = rows.batch(d.global_batch_size // process_count, drop_remainder=True)
  if d.num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return batches


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Iterator of dict[str, np.ndarray] batches of `global_batch_size // process_count` packed rows.

  Fields follow tuna2_jax.sequence (positions [B, 3, L]); the iterator has get_state() / set_state().
  """
  return iter(make_dataset(config, process_index=process_index, process_count=process_count))


def make_eval_examples(config, split: str = "test", num: int | None = None, *,
                       task: str = "understand") -> list[examples_lib.Example]:
  """The first `num` valid held-out examples of the mixture's first dataset that may become `task`, in
  stored order (understanding questions and generation prompts may come from different datasets).

  Images (and edit targets) are resized to a patch-multiple size under `data.max_image_patches` by the rule of
  images.py, so they can go into a row as they are; `meta` holds the ground truth (objects, word, ...).
  """
  d = config.data
  num = config.eval.num_examples if num is None else num
  allowed = [item.name for item in parse_mixture(d.dataset) if item.allows(task)]
  if not allowed:
    raise ValueError(f"data.dataset={d.dataset!r}: no dataset may become {task!r} documents to evaluate")
  name = allowed[0]
  src = SafeSource(open_source(name, d.data_dir, split), name)
  decode = examples_lib.DecodeExamples(image_key=_get(config, "image_key", "image"),
                                       text_key=_get(config, "text_key", "caption"), max_skip_fraction=1.0)
  opts = task_options(config)
  out = []
  for i in range(len(src)):
    if len(out) == num:
      break
    ex = decode.map(src[i])
    if ex is None:
      continue
    image = images.fit_image(ex.image, patch_size=opts.patch_size, max_patches=opts.max_image_patches,
                             mode=opts.image_mode, aspects=opts.bucket_aspects)
    edits = [(t, images.resize(tgt, *image.shape[:2])) for t, tgt in ex.edits]
    out.append(dataclasses.replace(ex, image=image, edits=edits))
  return out
