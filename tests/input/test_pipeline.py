"""The Grain pipeline end to end on a small tuna_shapes dataset: contract, determinism, resume, sharding,
skips."""

import gc
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from contract_check import check_batch, check_row

from data import shapes
from tuna2_jax import sequence as seq
from tuna2_jax.input import examples, pipeline, sources, tasks, tokenizer


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_follow_contract(debug_config):
  c = debug_config
  special = tokenizer.get_tokenizer(c).special
  it = pipeline.make_train_iterator(c)
  roles = set()
  for batch in _take(it, 3):
    assert batch["positions"].shape == (c.data.global_batch_size, 3, c.data.seq_len)
    check_batch(batch, batch_size=c.data.global_batch_size, seq_len=c.data.seq_len,
                patch_size=c.model.patch_size, special=special)
    roles |= set(np.unique(batch["image_role"]).tolist())
  assert roles == {0, 1, 2}, "understanding and generation images both appear"


def test_deterministic_and_resumable_in_process(debug_config):
  first = _take(pipeline.make_train_iterator(debug_config), 3)
  it = pipeline.make_train_iterator(debug_config)
  for a, b in zip(first, _take(it, 3), strict=True):
    _assert_same(a, b)
  state = it.get_state()
  want = _take(it, 2)
  fresh = pipeline.make_train_iterator(debug_config)
  fresh.set_state(state)
  for a, b in zip(want, _take(fresh, 2), strict=True):
    _assert_same(a, b)


def test_resumable_with_two_workers(debug_config):
  c = debug_config
  c.data.num_workers, c.data.seq_len, c.data.global_batch_size, c.data.packing_bins = 2, 128, 2, 4
  it = pipeline.make_train_iterator(c)
  _take(it, 2)
  state = it.get_state()
  want = _take(it, 2)
  del it
  gc.collect()
  # A fresh iterator (a restarted job) restored from the state gives the same batches. The state is tied to
  # num_workers: each worker packs its own slice of the data, so other worker counts give other rows.
  fresh = pipeline.make_train_iterator(c)
  fresh.set_state(state)
  for a, b in zip(want, _take(fresh, 2), strict=True):
    _assert_same(a, b)
  del fresh
  gc.collect()


def test_process_shards_are_disjoint_and_cover(debug_config, shapes_dir):
  src = tfds.data_source("tuna_shapes", split="train", data_dir=shapes_dir)
  ids = []
  for p in range(3):
    ds = pipeline.examples_dataset(debug_config, src, name="shapes", seed=0, process_index=p, process_count=3)
    ids.append({ds[i].id for i in range(len(src) // 3)})  # one epoch of this shard
  assert all(not (ids[a] & ids[b]) for a in range(3) for b in range(a + 1, 3))
  assert set.union(*ids) == {f"shapes/train/{i}" for i in range(len(src))}
  batch = next(pipeline.make_train_iterator(debug_config, process_index=1, process_count=2))
  assert batch["tokens"].shape[0] == debug_config.data.global_batch_size // 2


class CorruptShapes(shapes.TunaShapes):
  """tuna_shapes with a broken PNG in record 2 and broken JSON metadata in record 5."""

  name = "test_corrupt_shapes"

  def _generate_examples(self, split):
    for key, ex in super()._generate_examples(split):
      if key.endswith("/2"):
        ex = dict(ex, image=io.BytesIO(b"\x89PNG but not really"))
      if key.endswith("/5"):
        ex = dict(ex, meta="{broken json")
      yield key, ex


def test_corrupt_records_are_skipped_and_counted(tmp_path, debug_config):
  CorruptShapes(data_dir=str(tmp_path), num_train=12, num_test=0).download_and_prepare()
  src = tfds.data_source("test_corrupt_shapes", split="train", data_dir=str(tmp_path))
  examples.reset_skip_counts()
  c = debug_config
  c.data.max_skip_fraction = 1.0
  it = iter(pipeline.make_dataset(c, sources={"shapes": src}))
  _take(it, 4)  # more than one epoch of 12 records: both bad ones were met
  counts = examples.skip_counts()
  assert counts["unreadable"] >= 1 and counts["JSONDecodeError"] >= 1, counts
  # Too many bad records is an error that names the record, not silent data loss.
  decode = examples.DecodeExamples(max_skip_fraction=0.01)
  bad = {"_index": 7, "_source": "x", "_error": "broken"}
  with pytest.raises(examples.InputDataError, match="x record 7"):
    for _ in range(examples.MIN_RECORDS_FOR_FRACTION):
      assert decode.map(bad) is None



def test_missing_dataset_names_the_build_command(tmp_path, debug_config):
  debug_config.data.data_dir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match=r"python -m data\.shapes --data_dir=.*nothing"):
    pipeline.make_train_iterator(debug_config)


def test_packing_efficiency_default_mixture(shapes_dir):
  from configs import tuna2_tiny

  c = tuna2_tiny.get_config()
  c.data.data_dir = shapes_dir
  it = pipeline.make_train_iterator(c)
  fill = np.mean([(b["segment_ids"] > 0).mean() for b in _take(it, 6)])
  assert fill >= 0.9, fill


def test_eval_examples(debug_config):
  exs = pipeline.make_eval_examples(debug_config, split="test", num=5)
  assert len(exs) == 5 and all(e.id.startswith("shapes/test/") for e in exs)
  p = debug_config.model.patch_size
  for e in exs:
    assert e.image.shape[0] % p == 0 and e.image.shape[1] % p == 0 and e.qa and e.prompt and e.meta["objects"]
    assert all(t.shape == e.image.shape for _, t in e.edits)


def test_cfg_drop_and_unconditional_row(debug_config):
  c = debug_config
  tok = tokenizer.get_tokenizer(c)
  ex = pipeline.make_eval_examples(c, num=1)[0]
  opts = pipeline.task_options(c)
  always = tasks.TaskOptions(**{**opts.__dict__, "cfg_drop_prob": 1.0})
  never = tasks.TaskOptions(**{**opts.__dict__, "cfg_drop_prob": 0.0})
  rng = np.random.default_rng(0)
  dropped = tasks.generate_task(ex, rng, tok, always)
  kept = tasks.generate_task(ex, rng, tok, never)
  assert list(dropped[0].ids) == [tok.special.bos]
  assert tok.decode(kept[0].ids) == ex.prompt
  # Sampling rows: the unconditional one is exactly a dropped training document.
  uncond = tasks.generation_row(tok, None, 16, 24, seq_len=64, patch_size=8)
  cond = tasks.generation_row(tok, "Draw a red circle.", 16, 24, seq_len=64, patch_size=8)
  for row in (uncond, cond):
    check_row(row, seq_len=64, patch_size=8, special=tok.special)
  assert (uncond["image_role"] == seq.GENERATE).sum() == 1 + 2 * 3
  train_row = seq.pack_documents([tasks.generation_document([], np.zeros((16, 24, 3), np.uint8), tok)],
                                 seq_len=64, patch_size=8, special=tok.special)
  for k in seq.FIELDS:
    np.testing.assert_array_equal(uncond[k], train_row[k])
  assert tok.decode(cond["tokens"][cond["modality"] == seq.TEXT]) == "Draw a red circle."


def test_mixture_with_a_generic_image_text_source(debug_config, shapes_dir):
  c = debug_config
  c.data.dataset = "shapes:1,plain:1"
  plain = [{"image": np.full((24, 40), 10 * i, np.uint8), "caption": f"gray level {i}"} for i in range(10)]
  src = tfds.data_source("tuna_shapes", split="train", data_dir=shapes_dir)
  batch = next(iter(pipeline.make_dataset(c, sources={"shapes": src, "plain": plain})))
  tok = tokenizer.get_tokenizer(c)
  check_batch(batch, batch_size=c.data.global_batch_size, seq_len=c.data.seq_len,
              patch_size=c.model.patch_size, special=tok.special)
  text = "".join(tok.decode(row) for row in batch["tokens"])
  assert "gray level" in text and ("shape" in text or "Draw" in text)


@pytest.mark.parametrize("field", ["cfg_drop_prob", "qa_first_prob"])
def test_probabilities_outside_unit_interval_name_the_field(debug_config, field):
  c = debug_config.copy_and_resolve_references()
  c.data[field] = 1.5
  with pytest.raises(ValueError, match=f"data.{field}=1.5 must be in"):
    pipeline.validate_data_config(c)


def test_mixture_item_tasks_are_parsed_and_checked(debug_config):
  items = sources.parse_mixture("shapes/small@understand+edit:2, shapes/draw@generate")
  assert items == [("shapes/small", 2.0, ("understand", "edit")), ("shapes/draw", 1.0, ("generate",))]
  assert sources.parse_mixture("shapes:3")[0].tasks == ()
  with pytest.raises(ValueError, match=r"'shapes' names unknown tasks \['draw'\]"):
    sources.parse_mixture("shapes@draw")
  c = debug_config.copy_and_resolve_references()
  c.data.dataset = "shapes@text"
  c.data.task_weights.text = 0.0
  with pytest.raises(ValueError, match="'shapes' may only become text"):
    pipeline.validate_data_config(c)


def test_mixture_keeps_each_source_to_its_tasks(debug_config, shapes_dir):
  c = debug_config
  c.data.dataset = "shapes@understand:1,plain@generate:1"
  plain = [{"image": np.full((24, 40), 10 * i, np.uint8), "caption": f"gray level {i}"} for i in range(10)]
  src = tfds.data_source("tuna_shapes", split="train", data_dir=shapes_dir)
  roles = {"plain": set(), "shapes": set()}
  for batch in _take(iter(pipeline.make_dataset(c, sources={"shapes": src, "plain": plain})), 3):
    for row in range(batch["tokens"].shape[0]):
      is_patch = batch["modality"][row] == seq.PATCH
      for image in set(batch["image_ids"][row][is_patch]):
        at = is_patch & (batch["image_ids"][row] == image)
        # A plain image is one gray level all over; a shapes image never is.
        kind = "plain" if np.ptp(batch["patches"][row][at]) == 0 else "shapes"
        roles[kind].update(batch["image_role"][row][at])
  assert roles == {"plain": {seq.GENERATE}, "shapes": {seq.UNDERSTAND}}


def test_eval_examples_come_from_the_source_of_the_task(debug_config, shapes_dir):
  c = debug_config
  shapes.build(shapes_dir, "draw", num_train=0, num_test=4, num_workers=0)
  c.data.dataset = "shapes@understand+edit:1,shapes/draw@generate:1"
  und = pipeline.make_eval_examples(c, "test", 3)
  gen = pipeline.make_eval_examples(c, "test", 3, task="generate")
  assert all(len(e.meta["objects"]) >= 1 and e.qa for e in und)
  assert [len(e.meta["objects"]) for e in gen] == [1, 1, 1] and all("in the center" in e.prompt for e in gen)
  assert und[0].prompt != gen[0].prompt
  c.data.dataset = "shapes@understand"
  with pytest.raises(ValueError, match="no dataset may become 'generate'"):
    pipeline.make_eval_examples(c, "test", 3, task="generate")
